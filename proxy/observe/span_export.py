"""Where finished spans go: the OpenTelemetry SDK's span processors and exporters,
in this process (`SpanSink`, for tests and embedders that hand over exporter
objects) or in a child process (`ProcessSpanSink`, what `OTEL_TRACES_EXPORTER`
configures when loopwatch runs).

Why a child process: under handshake load the event loop is the one busy
thread, and everything the SDK does with a finished span (building the
`ReadableSpan`, the BatchSpanProcessor's queue and export thread, protobuf
encoding, HTTP) holds the same GIL. A child process does that on another core;
the event loop only packs each span as a tuple of plain values (tracing.py's
record) and a writer thread hands batches of them over a pipe (`marshal`, a
length prefix per batch). Sampling and ids stay in this process: the sampled
flag goes into the `traceparent` sent upstream before any span exists.

Bounded like the SDK's own queue, in spans: at most `QUEUE_SPANS` wait for the
writer (in batches of any size: a batch is what ended in 50 ms); when a batch
would not fit (the child is slower than the traffic) or the child is gone,
spans are dropped and counted (`dropped`, `loopwatch_spans_dropped_total`),
and a child that died is started again, at most once per `RESPAWN_INTERVAL`.
The child reads until end of input, so it also ends when loopwatch is killed,
exporting what it holds first.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import queue
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from ... import __version__
from ...detectors.units import escalated

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("loopwatch.tracing")

EXPORTERS = ("none", "console", "otlp")
# Spans waiting for the writer thread; beyond, a batch is dropped. Counted in
# spans, not batches: a batch is every span that ended in 50 ms, as many as the
# traffic makes, and 256 batches held 800 MB at 3 400 connections a second.
QUEUE_SPANS = 8192
RESPAWN_INTERVAL = 1.0  # seconds between attempts to start a child that died …
RESPAWN_MAX = 60.0  # … doubled, up to this, while each dies within STABLE_CHILD of its start
STABLE_CHILD = 10.0
FLUSH = "flush"  # the one command frame: export what you hold, then answer on the ack pipe
# The batch span processor's variables, their SDK defaults, and the most
# loopwatch takes (a queue of spans is memory: ~1 KB a span).
BSP_QUEUE_SIZE = 2048  # the SDK's default OTEL_BSP_MAX_QUEUE_SIZE
BSP_VARIABLES = {  # default, least, most
    "OTEL_BSP_MAX_QUEUE_SIZE": (BSP_QUEUE_SIZE, 1, 1_000_000),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": (512, 1, 1_000_000),
    "OTEL_BSP_SCHEDULE_DELAY": (5_000, 1, 3_600_000),  # milliseconds
    "OTEL_BSP_EXPORT_TIMEOUT": (30_000, 0, 3_600_000),  # milliseconds; the SDK takes 0 too
}
# The child's reports on its ack pipe, each a kind and a number: the answer to a
# FLUSH (1: all exported), the spans it lost so far (its SDK's side), and those
# whose fate it knows (lost or delivered): the rest die with it if it dies.
_REPORT = struct.Struct(">cQ")
_FLUSHED, _LOST, _SETTLED, _EXPORTED = b"F", b"L", b"S", b"E"
LOSS_REPORT_EVERY = 1.0  # seconds between the child's reports of its losses, while they grow
_LENGTH = struct.Struct(">I")



# --- one finished span, as named plain values ---------------------------------------


class RequestValues(NamedTuple):
    """What the upgrade request said (the span's attributes known at its start)."""

    path: str | None  # None: not known (an Attempt that carried no trace context)
    peer: str
    route: str
    key: str
    authority: bytes | None  # the Host header
    user_agent: bytes | None


class CloseValues(NamedTuple):
    """How a relayed connection ended."""

    conn_id: int
    code: int
    reason: str
    initiator: str
    duration: float  # seconds, 101 to close
    messages_in: int  # client → upstream
    messages_out: int
    bytes_in: int
    bytes_out: int


class ParentValues(NamedTuple):
    """The remote parent's span context (the client's traceparent)."""

    trace_id: int
    span_id: int
    flags: int
    remote: bool
    trace_state: str | None  # its tracestate header


class SpanEvent(NamedTuple):
    name: str
    attributes: dict[str, Any]
    time_ns: int


class SpanStatus(NamedTuple):
    code: int  # a StatusCode value
    description: str | None


class Record(NamedTuple):
    """One finished span as plain values (proxy/observe/tracing.py: ConnTrace.record;
    `readable_span` there makes the SDK's ReadableSpan of it). `marshal` carries
    plain tuples only: `to_wire` and `from_wire` convert at the pipe."""

    trace_id: int
    span_id: int
    flags: int
    trace_state: str | None  # its tracestate header
    parent: ParentValues | None
    start: int  # ns since the epoch
    end: int
    request: RequestValues
    extra: dict[str, Any] | None  # attributes of the rarer steps (refusal, failed handshake …)
    close: CloseValues | None  # None: never relayed
    events: list[SpanEvent] | None
    status: SpanStatus | None  # None: unset


# A NamedTuple's own `__new__` is a Python function: a call costs ~2 k
# instructions. The per-connection records are built with `new_record(Cls,
# (field, …))` instead, every field in the class's order: the same record,
# built in C (docs/performance.md, "callgrind counts before and after the
# observer split").
new_record = tuple.__new__


def to_wire(r: Record) -> tuple[Any, ...]:
    """The record as nested plain tuples, which marshal can carry. Runs in the
    writer thread for every span: unpacked once, each named part sliced (a
    slice of a tuple subclass is a plain tuple) rather than passed to tuple()."""
    trace_id, span_id, flags, state, parent, start, end, request, extra, close, events, status = r
    return (
        trace_id, span_id, flags, state, None if parent is None else parent[:], start, end,
        request[:], extra, None if close is None else close[:],
        None if events is None else [e[:] for e in events], None if status is None else status[:],
    )  # fmt: skip


def from_wire(t: Sequence[Any]) -> Record:
    """`to_wire`'s tuple as the record again; a tuple of another shape is refused."""
    if len(t) != len(Record._fields):
        raise ValueError(f"a span record has {len(Record._fields)} fields, got {len(t)}")
    parent, close, events, status = t[4], t[9], t[10], t[11]
    return Record(
        t[0], t[1], t[2], t[3], None if parent is None else ParentValues._make(parent), t[5], t[6],
        RequestValues._make(t[7]), t[8], None if close is None else CloseValues._make(close),
        None if events is None else [SpanEvent._make(e) for e in events],
        None if status is None else SpanStatus._make(status),
    )  # fmt: skip


Convert = Callable[[Record, "Resource", "InstrumentationScope"], "ReadableSpan"]


# Seconds loopwatch waits at its stop for the span exporter process to export
# what it holds and exit (then it is killed, and those spans are lost).
CHILD_EXIT_WAIT = 10.0


class TracingConfigError(ValueError):
    """An OTEL_* variable loopwatch cannot honour; the message names it."""


# --- the configuration ------------------------------------------------------------


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names ([] for none), checked, with the
    OTLP protocol: what loopwatch cannot honour is refused before anything starts."""
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: expected none, console or otlp (comma-separated), got {unknown[0]!r}"
        )
    if "none" in names:
        return []
    batch_settings(env)  # refused here, with the exporter, as the rest
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(var)
            if protocol is not None:
                if protocol.strip().lower() != "http/protobuf":
                    raise TracingConfigError(
                        f"{var}: loopwatch exports OTLP over http/protobuf only, got {protocol!r}"
                    )
                break
    return [n for n in EXPORTERS if n in names]


@dataclass(frozen=True)
class BatchSettings:
    """The batch span processor's settings (OTEL_BSP_*), checked."""

    max_queue_size: int
    max_export_batch_size: int
    schedule_delay_millis: int
    export_timeout_millis: int


def batch_settings(env: Mapping[str, str]) -> BatchSettings:
    """OTEL_BSP_* as the SDK reads them, refused where it would fail or ignore
    them: a queue smaller than the batch (the SDK's default batch is 512) made
    the span exporter die at its first span, again every second, every span
    lost and a third of a core spent (the sinks probe), and check-config
    passed it. A value that is no whole number the SDK ignores with a
    traceback."""
    values = {}
    for var, (default, least, most) in BSP_VARIABLES.items():
        raw = env.get(var)
        if raw is None or not raw.strip():
            values[var] = default
            continue
        try:
            value = int(raw)
        except ValueError:
            raise TracingConfigError(f"{var}: expected a whole number from {least} to {most}, got {raw!r}") from None
        if not least <= value <= most:
            raise TracingConfigError(f"{var}: expected a whole number from {least} to {most}, got {raw!r}")
        values[var] = value
    queue, batch = values["OTEL_BSP_MAX_QUEUE_SIZE"], values["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"]
    if batch > queue:
        raise TracingConfigError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: a batch ({batch}) must fit the queue (OTEL_BSP_MAX_QUEUE_SIZE, "
            f"{queue}); set it to {queue} or less"
        )
    return BatchSettings(queue, batch, values["OTEL_BSP_SCHEDULE_DELAY"], values["OTEL_BSP_EXPORT_TIMEOUT"])


def exporters_from_env(env: Mapping[str, str]) -> list[SpanExporter]:
    out: list[SpanExporter] = []
    names = exporter_names(env)
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*. A credential
        # provider's session (OTEL_PYTHON_EXPORTER_OTLP_HTTP_*CREDENTIAL_PROVIDER)
        # is the SDK's to load, and reads answers unbounded.
        providers = [var for var in env if var.startswith("OTEL_PYTHON_EXPORTER_OTLP_HTTP_") and "CREDENTIAL" in var]
        out.append(OTLPSpanExporter(session=None if providers else bounded_session()))
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out.append(ConsoleSpanExporter())
    return out


# What of a collector's answer is read: an OTLP answer is a few bytes (a
# partial success names its rejected spans); the status says the rest.
MAX_ANSWER = 64 * 1024
ANSWER_CHUNK = 16 * 1024


def bounded_session() -> Any:
    """A requests session that reads at most MAX_ANSWER bytes of an answer's
    body, and for no longer than the request's timeout, then lets the
    connection go. The SDK's session read the whole body, with its timeout per
    read: a collector (or a middlebox) answering 200 MiB took 137 MB into the
    child, and one that trickled its answer a byte at a time held the export
    for good (the sinks probe). An answer's head is read before any of this
    (a collector that trickles its headers still holds its export)."""
    import requests

    class BoundedSession(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
            settings = super().merge_environment_settings(*args, **kwargs)
            if isinstance(self.verify, str):
                # OTEL_EXPORTER_OTLP_CERTIFICATE, set by the exporter: requests
                # let REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE win over it, and every
                # export to a collector with a private CA failed (the new4 probe).
                settings["verify"] = self.verify
            return settings

    session = BoundedSession()
    session.hooks["response"].append(_read_bounded)
    return session


def _read_bounded(response: Any, *args: Any, timeout: Any = None, **kwargs: Any) -> None:
    """A response hook: it runs before requests reads the body, and reads it
    itself; what requests then reads is what is left (nothing). The time is
    kept by a timer that cuts the socket: one read may take for ever (a chunk
    size line or trailers trickled a byte at a time, each byte within the
    timeout of a read); and between reads, for a socket the timer cannot cut."""
    import urllib3

    seconds = timeout if isinstance(timeout, int | float) else 10.0
    deadline = time.monotonic() + seconds
    sock = getattr(response.raw.connection, "sock", None)
    late = threading.Event()
    settled = threading.Lock()  # the timer cuts only while the hook is still reading
    reading = True

    def cut() -> None:
        with settled:
            if not reading:
                return  # the answer was read in time: the connection may serve the next export
            late.set()
            _shut(response.raw, sock)

    timer = threading.Timer(seconds, cut)
    timer.daemon = True
    timer.start()
    read, whole = 0, False
    try:
        while read <= MAX_ANSWER and time.monotonic() < deadline:
            chunk = response.raw.read1(ANSWER_CHUNK)  # what has come, up to a chunk
            if not chunk:
                whole = True
                break
            read += len(chunk)
    except (OSError, ValueError, urllib3.exceptions.HTTPError):
        pass  # a connection cut mid-answer (by the timer too): its status was read, the rest does not matter
    finally:
        with settled:
            reading = False
        timer.cancel()
    if whole and not late.is_set():
        return  # the whole answer, in time: the connection goes back to the pool
    response.close()  # more than that, too slow, or cut: this connection is not reused


def _shut(raw: Any, sock: Any) -> None:
    """Shut an answer's socket down from another thread, both ways (the
    collector sees the end): the connection's socket, or through an HTTPS
    proxy the one urllib3's SSLTransport wraps (it has no shutdown of its
    own). For an answer that says it will close, http.client took the socket
    from the connection (the new6 probe's hang): urllib3's `shutdown()`, which
    kept the socket's own, ends the reading. An answer through an HTTPS proxy
    that says it will close has none of them: the deadline between reads is
    all that bounds it."""
    for candidate in (sock, getattr(sock, "socket", None)):
        shutdown = getattr(candidate, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)
            return
    with contextlib.suppress(AttributeError, ValueError, RuntimeError, OSError):
        raw.shutdown()


class SdkParts:
    """The SDK's resource and id generator, as a TracerProvider resolves them from the
    environment, and the sampler OTEL_TRACES_SAMPLER names (`sampling_from_env`);
    spans never go through its tracers."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        plan = sampling_from_env(os.environ if env is None else env)
        # service.name defaults to loopwatch; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
        from_env = OTELResourceDetector().detect().attributes
        resource = Resource.create({"service.name": "loopwatch", "service.version": __version__, **from_env})
        provider = TracerProvider(resource=resource, sampler=plan.sampler, shutdown_on_exit=False)
        self.resource = provider.resource
        self.sampler = plan.sampler
        self.ids = provider.id_generator
        self.random_trace_ids = self.ids.is_trace_id_random()  # a property of the generator
        self.new_ids = _id_pairs(self.ids)
        self.root_bound = plan.root_bound
        self.parent_based = plan.parent_based
        self.sampler_reads_attributes = plan.reads_attributes
        self.scope = InstrumentationScope("loopwatch", __version__)


def _id_pairs(ids: IdGenerator) -> Callable[[], tuple[int, int]]:
    """A new root span's (trace id, span id). With the SDK's RandomIdGenerator (the
    default), both from one draw of the same `random` it uses: one call per
    connection instead of two of its methods."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    if type(ids) is not RandomIdGenerator:
        return lambda: (ids.generate_trace_id(), ids.generate_span_id())

    def pair(draw: Callable[[int], int] = random.getrandbits) -> tuple[int, int]:
        bits = draw(192)
        trace_id, span_id = bits >> 64, bits & 0xFFFF_FFFF_FFFF_FFFF
        if trace_id and span_id:  # an all-zero id is invalid (p = 2^-64)
            return trace_id, span_id
        return ids.generate_trace_id(), ids.generate_span_id()

    return pair


ALL_ROOTS = 1 << 64  # a root_bound every trace id passes
# The names OTEL_TRACES_SAMPLER may give (the SDK's own samplers).
SAMPLERS = ("always_on", "always_off", "traceidratio",
            "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")  # fmt: skip


class SamplingPlan(NamedTuple):
    """How spans are sampled, as loopwatch configured it."""

    sampler: Sampler  # the SDK's sampler of that name: asked (should_sample) for spans with a parent
    # A root span is sampled (with exactly its attributes, no trace state) iff its
    # trace id's low 64 bits are below this bound: what the SDK's samplers compute,
    # without the call (~20 k instructions a connection). None: ask `sampler`.
    root_bound: int | None
    reads_attributes: bool  # False: the sampler decides on ids and parent alone
    # A span with a parent follows the parent's sampled flag (parentbased_*);
    # else the root bound decides for it too (the native data plane reads this).
    parent_based: bool = True


def sampling_from_env(env: Mapping[str, str]) -> SamplingPlan:
    """The sampler OTEL_TRACES_SAMPLER (+ _ARG) names, built with the SDK's public
    constructors, and the root decision that follows from the name and rate.
    What loopwatch cannot honour is refused (the SDK would fall back with a warning)."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise TracingConfigError(f"OTEL_TRACES_SAMPLER: expected one of {', '.join(SAMPLERS)}, got {name!r}")
    parent_based = name.startswith("parentbased_")
    kind = name.removeprefix("parentbased_")
    root: sampling.Sampler
    if kind == "traceidratio":
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            rate = float(arg) if arg else 1.0  # the SDK's default rate
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG: expected a rate from 0 to 1, got {arg!r}")
        ratio = sampling.TraceIdRatioBased(rate)
        root, bound = ratio, ratio.bound
    elif kind == "always_on":
        root, bound = sampling.ALWAYS_ON, ALL_ROOTS
    else:
        root, bound = sampling.ALWAYS_OFF, 0
    sampler = sampling.ParentBased(root) if parent_based else root
    return SamplingPlan(sampler, bound, reads_attributes=False, parent_based=parent_based)


# --- in this process --------------------------------------------------------------------


class SpanSink(SdkParts):
    """Records become `ReadableSpan`s and go to the SDK's span processors here, one
    per exporter (batching: a caller never waits on an export).

    Every span lost on the way is counted (`dropped`): one a processor's queue
    has no room for (`OTEL_BSP_MAX_QUEUE_SIZE`: the collector is down or slower
    than the traffic), and one in a batch its exporter failed to deliver. The
    SDK's processor drops what does not fit its queue without a count, so a
    span is not handed to it while its queue may be full: the spans handed to
    it and not yet passed to its exporter are at most what it holds."""

    def __init__(self, exporters: list[SpanExporter], convert: Convert, *, batch: bool = True):
        super().__init__()
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.convert = convert
        self.counted = [Counted(e) for e in exporters]
        # Batched (the exporter child): the OTEL_BSP_* values checked at start,
        # given to the SDK. Unbatched (in-process tests) reads none of them.
        settings = batch_settings(os.environ) if batch else None
        self.processors: list[SpanProcessor] = [
            SimpleSpanProcessor(cast("SpanExporter", c))
            if settings is None
            else BatchSpanProcessor(
                cast("SpanExporter", c), max_queue_size=settings.max_queue_size,
                schedule_delay_millis=settings.schedule_delay_millis,
                max_export_batch_size=settings.max_export_batch_size,
                export_timeout_millis=settings.export_timeout_millis,
            )  # fmt: skip
            for c in self.counted
        ]
        self.room = None if settings is None else settings.max_queue_size

    @property
    def dropped(self) -> int:
        """Spans lost: refused for a full queue, or in a batch an exporter failed."""
        return sum(c.refused + c.failed for c in self.counted)

    @property
    def settled(self) -> int:
        """Spans whose fate every exporter knows (the least of theirs): the rest
        are still queued or being exported, and lost if the process dies."""
        return min((c.settled for c in self.counted), default=0)

    @property
    def exported(self) -> int:
        """Spans delivered, each exporter's counted."""
        return sum(c.delivered for c in self.counted)

    def submit(self, records: Sequence[Record]) -> None:
        resource, scope, convert, room = self.resource, self.scope, self.convert, self.room
        for record in records:
            span = convert(record, resource, scope)
            for processor, counted in zip(self.processors, self.counted, strict=True):
                if room is not None and counted.handed - counted.reached >= room:
                    counted.refused += 1
                    continue
                counted.handed += 1
                processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()


class Counted:
    """An exporter, with the spans passed to it (`reached`: they left the
    processor's queue) and those in batches it failed to deliver (`failed`)
    counted; `handed` is the sink's count of spans given to its processor.
    The counts are plain ints each written by one thread (the sink's, the
    processor's export thread) and read by the other."""

    def __init__(self, exporter: SpanExporter):
        self.exporter = exporter
        self.handed = 0
        self.refused = 0  # the sink's: no room in the processor's queue
        self.reached = 0
        self.failed = 0
        self.delivered = 0

    @property
    def settled(self) -> int:
        """Spans whose fate is known: refused, failed or delivered."""
        return self.refused + self.failed + self.delivered

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.reached += len(spans)
        try:
            result = self.exporter.export(spans)
        except Exception:
            self.failed += len(spans)
            raise  # the processor logs it, as it did without the count
        if result is SpanExportResult.SUCCESS:
            self.delivered += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


# --- in a child process -------------------------------------------------------------------


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


_STOP = object()


class ProcessSpanSink(SdkParts):
    """Records go, in batches, to a child process that runs the SDK's processors and
    the exporters OTEL_TRACES_EXPORTER names (it reads the same environment).
    `env`: variables for the child on top of this process's (tests);
    `exporter_factory` ("module:callable" returning a list of exporters) replaces
    the configured exporters: the benchmarks' exporter that drops."""

    def __init__(self, *, env: Mapping[str, str] | None = None, exporter_factory: str | None = None):
        self.env = None if env is None or env is os.environ else {**os.environ, **env}
        super().__init__(self.env)
        self.exporter_factory = exporter_factory
        # Bounded in spans by `submit` (the FLUSH and STOP commands are not spans).
        self.queue: queue.Queue[object] = queue.Queue()
        # Spans put in the queue (by the event loop) and taken out (by the
        # writer): each written by one thread only, their difference is the backlog.
        self._put = 0
        self._taken = 0
        # Spans lost, counted by the thread that lost them (a `+=` shared by two
        # threads can lose an update): the queue was full (the event loop's), or
        # the child was gone or a value could not be packed (the writer's).
        self._refused = 0
        self._lost = 0
        # What the children's SDKs lost (their reports): the child now's, and
        # those of the children before it (each starts from 0).
        self._child_lost = 0
        self._children_lost = 0
        self._child_sent = 0  # spans the child now was handed …
        self._child_settled = 0  # … and of those, the ones whose fate it reported
        self._child_exported = 0  # … and the ones it delivered (its report)
        self._children_exported = 0
        self.child: subprocess.Popen[bytes] | None = None
        self._ack = -1  # read end of the child's answers to FLUSH
        self._spawned_at = -RESPAWN_INTERVAL
        self._quick_deaths = 0  # children in a row that died within STABLE_CHILD of their start
        self._spawn()
        self._writer = threading.Thread(target=self._run, name="loopwatch-spans", daemon=True)
        self._writer.start()

    # --- the event loop's side ---------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Spans lost on the way to the collector: before the child, and in it."""
        return self._refused + self._lost + self._children_lost + self._child_lost

    @property
    def exported(self) -> int:
        """Spans delivered to the collector (each exporter's counted): with
        `dropped`, what became of them; a collector that takes requests and
        never answers shows as neither rising."""
        return self._children_exported + self._child_exported

    @property
    def queued(self) -> int:
        """Spans waiting for the writer thread (at most QUEUE_SPANS)."""
        return self._put - self._taken

    def submit(self, records: Sequence[Record]) -> None:
        if self.queued + len(records) > QUEUE_SPANS:
            self._refused += len(records)
            return
        self._put += len(records)
        self.queue.put_nowait(records)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Every span submitted so far exported (or dropped); blocks up to the timeout."""
        request = _Flush()
        self.queue.put_nowait(request)
        return request.done.wait(timeout_millis / 1000) and request.ok

    def shutdown(self, timeout: float = 30.0) -> None:
        """Hand over what is queued, let the child export it and exit (blocking)."""
        if not self._writer.is_alive():
            return
        self.queue.put(_STOP)
        self._writer.join(timeout)

    # --- the writer thread ----------------------------------------------------------------

    def _spawn(self) -> None:
        self._spawned_at = time.monotonic()
        ack_read, ack_write = os.pipe()
        # -P: the current directory is not put on the child's path, so a folder named like
        # one of loopwatch's packages where loopwatch was started cannot shadow it.
        cmd = [sys.executable, "-P", "-m", "loopwatch.proxy.observe.span_export", str(ack_write)]
        if self.exporter_factory:
            cmd.append(self.exporter_factory)
        try:
            self.child = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, pass_fds=(ack_write,), bufsize=0, env=self.env
            )
        except OSError as e:
            os.close(ack_read)
            self.child = None
            log.error("span_exporter_failed", extra={"fields": {"error": str(e)}})
        else:
            self._ack = ack_read
        finally:
            os.close(ack_write)

    def _alive(self) -> bool:
        if self.child is not None and self.child.poll() is None:
            return True
        now = time.monotonic()
        if self.child is not None:
            # One that dies at its start (an exporter it cannot make) is tried
            # less and less often: once a second for ever, it spent a third of
            # a core and a log line each time (the sinks probe).
            self._quick_deaths = 0 if now - self._spawned_at >= STABLE_CHILD else self._quick_deaths + 1
            log.error(
                "span_exporter_exited",
                extra={"fields": {
                    "returncode": self.child.returncode, "spans_dropped_so_far": self.dropped,
                    "next_start_in": round(max(0.0, self._spawned_at + self._respawn_wait() - now), 3),
                }},
            )  # fmt: skip
            self._close_child()
        if now - self._spawned_at >= self._respawn_wait():
            self._spawn()
        return self.child is not None

    def _respawn_wait(self) -> float:
        return escalated(RESPAWN_INTERVAL, 2.0, self._quick_deaths - 1, RESPAWN_MAX)

    def _close_child(self) -> None:
        """Done with the child (it exited, or was stopped): what it reported last
        is read, and what it was handed without reporting its fate is lost with
        it (a child killed mid-export), counted."""
        if self.child is not None and self.child.stdin is not None:
            with contextlib.suppress(OSError):
                self.child.stdin.close()
        self._read_reports(0.0)
        if self._ack >= 0:
            os.close(self._ack)
            self._ack = -1
        self.child = None
        unsettled = max(self._child_sent - self._child_settled, 0)
        self._children_lost += self._child_lost + unsettled
        self._children_exported += self._child_exported
        self._child_lost = self._child_sent = self._child_settled = self._child_exported = 0

    def _send(self, payload: bytes) -> bool:
        child = self.child
        assert child is not None and child.stdin is not None
        frame = memoryview(_LENGTH.pack(len(payload)) + payload)
        try:
            while frame:  # a signal can cut a blocking write short
                frame = frame[child.stdin.write(frame) or 0 :]
        except OSError:  # BrokenPipeError: the child is gone
            return False
        return True

    def _run(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=LOSS_REPORT_EVERY)
            except queue.Empty:
                self._read_reports(0.0)  # idle: the child's losses still come in
                continue
            if item is _STOP:
                break
            if isinstance(item, _Flush):
                item.ok = self._alive() and self._send(marshal.dumps(FLUSH)) and self._answer()
                item.done.set()
                continue
            records: Sequence[Record] = item  # type: ignore[assignment]  # the queue's other items (_STOP, _Flush) are handled above
            self._taken += len(records)
            payload, unpackable = _pack(records)
            self._lost += unpackable
            if payload is not None:
                if self._alive() and self._send(payload):
                    self._child_sent += len(records) - unpackable
                else:
                    self._lost += len(records) - unpackable
            self._read_reports(0.0)
        if self.child is not None:
            child = self.child
            if child.stdin is not None:
                with contextlib.suppress(OSError):
                    child.stdin.close()  # end of input: the child exports what it holds and exits
            try:
                # Bounded so that a collector that does not answer cannot hold the
                # stop past a container's grace period (shutdown_timeout + this).
                child.wait(CHILD_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            self._close_child()  # its last reports, and what it could not export

    def _answer(self, timeout: float = 30.0) -> bool:
        """The child's answer to a FLUSH (its loss reports read on the way)."""
        return self._read_reports(timeout, until_flushed=True) is True

    def _read_reports(self, timeout: float, *, until_flushed: bool = False) -> bool | None:
        """Read the child's reports waiting on the ack pipe (waiting up to
        `timeout` for the first, and with `until_flushed` for a flush's answer):
        its losses so far, and the flush's answer (None: no answer read)."""
        deadline = time.monotonic() + timeout
        while self._ack >= 0:
            wait = max(deadline - time.monotonic(), 0.0)
            ready, _, _ = select.select([self._ack], [], [], wait)
            if not ready:
                return None
            report = _read_exactly(self._ack, _REPORT.size)
            if report is None:
                return None  # the child is gone; `_alive` finds out
            kind, value = _REPORT.unpack(report)
            if kind == _FLUSHED:
                return bool(value)
            if kind == _LOST:
                self._child_lost = value
            elif kind == _SETTLED:
                self._child_settled = value
            elif kind == _EXPORTED:
                self._child_exported = value
            if not until_flushed:
                deadline = 0.0  # take what is there, wait for nothing more
        return None


def _read_exactly(fd: int, n: int) -> bytes | None:
    """`n` bytes from a pipe whose writer writes whole reports (a write of under
    PIPE_BUF bytes is atomic); None at its end."""
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _pack(records: Sequence[Record]) -> tuple[bytes | None, int]:
    """The batch as one frame's payload (None: nothing left to send), and how many
    of its spans had to be left out."""
    wire = [to_wire(r) for r in records]
    try:
        return marshal.dumps(wire), 0
    except ValueError:  # a value marshal cannot carry (a custom sampler's attribute): drop that span only
        kept = []
        for record in wire:
            try:
                marshal.dumps(record)
            except ValueError:
                log.warning("span_dropped", extra={"fields": {"why": "attribute value not exportable"}})
            else:
                kept.append(record)
        return (marshal.dumps(kept) if kept else None), len(records) - len(kept)


CHILD_NICENESS = 10  # added to loopwatch's own


def yield_to_the_event_loop() -> None:
    """Run this process as background work: SCHED_BATCH (its wake-ups do not
    preempt whatever runs on that core, the event loop included) and a lower
    priority. Measured under handshake load on 2 cores: at the default priority
    the exporter's wake-ups, though ~3 % of a core, cost the event loop ~10 % of
    its handshake rate (docs/performance.md, "Telemetry overhead"). Starved of CPU,
    the exporter falls behind and spans are dropped and counted
    (`loopwatch_spans_dropped_total`): telemetry gives way to traffic, not the
    other way round."""
    with contextlib.suppress(OSError, AttributeError):  # a sandbox may forbid it: run as is
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICENESS)


def child_main(argv: list[str] | None = None) -> None:
    """The child: frames from stdin into the SDK's processors, until end of input.
    argv: the ack pipe's fd, then optionally an exporter factory "module:callable"."""
    import importlib
    import signal

    from .tracing import readable_span

    # Ctrl-C and a SIGTERM sent to the whole process group (a container runtime,
    # `kill -- -PGID`) reach the child too; it ends at end of input instead, once
    # loopwatch has handed over its last spans.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield_to_the_event_loop()
    # The SDK's own warnings (a collector down, a full queue) as loopwatch's JSON
    # lines on the shared stderr, not Python's last-resort plain text.
    from .logs import setup_logging

    setup_logging("warning", "json")

    args = sys.argv[1:] if argv is None else argv
    ack = int(args[0])
    try:
        if len(args) > 1:
            module, _, name = args[1].partition(":")
            exporters = getattr(importlib.import_module(module), name)()
        else:
            exporters = exporters_from_env(os.environ)
        sink = SpanSink(exporters, readable_span)
    except Exception:  # one JSON line, not Python's traceback in plain text on the shared stderr
        log.exception("span_exporter_start_failed")
        raise SystemExit(3) from None
    source = sys.stdin.buffer
    done = threading.Event()
    reported = [0, 0, 0]  # lost, settled, exported: as last said

    def report_losses() -> None:
        # What the SDK side lost (a full queue, failed exports), as it grows:
        # a collector's outage shows in loopwatch_spans_dropped_total. And how
        # many spans' fate is known, so that those it still holds are counted
        # lost if it dies.
        counts = ((_LOST, sink.dropped), (_SETTLED, sink.settled), (_EXPORTED, sink.exported))
        for i, (kind, now) in enumerate(counts):
            if now != reported[i]:
                reported[i] = now
                with contextlib.suppress(OSError):
                    os.write(ack, _REPORT.pack(kind, now))

    def reporter() -> None:
        while not done.wait(LOSS_REPORT_EVERY):
            report_losses()

    threading.Thread(target=reporter, name="loopwatch-span-losses", daemon=True).start()
    try:
        while True:
            header = source.read(_LENGTH.size)
            if len(header) < _LENGTH.size:
                break  # loopwatch closed the pipe (or is gone)
            (length,) = _LENGTH.unpack(header)
            body = source.read(length)
            if len(body) < length:
                break  # loopwatch died in the middle of a batch: export what came whole
            payload = marshal.loads(body)
            if payload == FLUSH:
                flushed = sink.force_flush()
                report_losses()  # before the answer: the flush's losses are counted when it returns
                os.write(ack, _REPORT.pack(_FLUSHED, 1 if flushed else 0))
            else:
                sink.submit([from_wire(t) for t in payload])
    finally:
        done.set()
        sink.shutdown()
        report_losses()  # the last word: what the shutdown exported or lost


__all__ = [
    "EXPORTERS",
    "ProcessSpanSink",
    "Record",
    "SamplingPlan",
    "SdkParts",
    "SpanSink",
    "TracingConfigError",
    "child_main",
    "exporter_names",
    "exporters_from_env",
    "from_wire",
    "new_record",
    "sampling_from_env",
    "to_wire",
]


if __name__ == "__main__":
    child_main()
