"""OpenTelemetry traces: one span per WebSocket connection, upgrade to close.

The pipeline is the OpenTelemetry SDK's, configured by the standard variables
the SDK itself reads: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` (+ `_ARG`), `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` /
`_HEADERS` / `_TIMEOUT`, `OTEL_BSP_*`. `OTEL_TRACES_EXPORTER` picks the
exporters (`none`, the default, `console`, `otlp` over HTTP/protobuf;
comma-separated for several); with `none` there is no span and no cost.

`TracingObserver` decides a connection's trace context when the upgrade
request arrives (a child of the client's `traceparent` when it sent one, the
SDK's sampler and id generator deciding), injects its own `traceparent` into
the request forwarded upstream so the backend's trace joins it, keeps the
request's and the close's values and the span events (findings, enforcement)
as the connection goes, and hands the finished span to the sink as a record
of plain values (span_export.Record), which `readable_span` turns into the SDK's
`ReadableSpan` where the exporters run (proxy/observe/span_export.py: a child process
when loopwatch runs, this process in tests).

Why not `Tracer.start_span`: a connection span is never made current, never
has children in this process, and is fully known only at its close, so the
SDK's live `Span` (a lock, bounded attribute maps validated per call, a copy
into a ReadableSpan at the end) is pure overhead here. Measured in the
proxy under handshake load it cost ~90 µs of CPU per connection, a quarter
of a whole handshake; the record costs the event loop a small fraction of
that (docs/performance.md, "Telemetry overhead"). Sampling, ids, resource,
processors and exporters stay the SDK's own.

What the other observers need of a connection's trace (its id for log lines
and exemplars, whether it is sampled) is written once on the connection's
record (`Connection.trace`, a TraceContext); they never ask this observer.
For steps that come without a connection (a wake-up's finding, a close-oldest)
it asks the runtime's read-only LiveView which connections a client has open
and finds its own span on each one's record (`Connection.state`, which only
this observer writes): no map of its own to keep per connection.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import (
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState

from ...detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from ...detectors.decisions import Reject
from ..dataplane.boundary import TraceContext, handshake_status
from .observers import Observer
from .span_export import (
    EXPORTERS,
    CloseValues,
    ParentValues,
    ProcessSpanSink,
    Record,
    RequestValues,
    SpanEvent,
    SpanSink,
    SpanStatus,
    TracingConfigError,
    exporter_names,
    exporters_from_env,
    new_record,
    sampling_from_env,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from ...detectors import events as ev
    from ...detectors.decisions import Admit, Outcome
    from ..app.settings import Settings
    from ..dataplane.boundary import Connection, LiveView, RelayStats

# Closes that mean something broke rather than that someone said goodbye.
ERROR_CODES = frozenset({1006, 1011, 1014})
_ROOT = Context()  # what a span without a remote parent is sampled against
_UNSET = Status(StatusCode.UNSET)
SAMPLED = int(TraceFlags.SAMPLED)  # the flag bit, for hot-path checks
FLUSH_DELAY = 0.05  # seconds an ended span waits to be handed to the sink

Sink = SpanSink | ProcessSpanSink


def make_tracing(exporters: list[SpanExporter], *, batch: bool = True) -> SpanSink:
    """Spans into these exporters, through the SDK's processors in this process."""
    return SpanSink(exporters, readable_span, batch=batch)


def tracing_env_errors(env: Mapping[str, str]) -> list[str]:
    """Every OTEL_* value `tracing_from_env` would refuse, so that check-config
    reports them and `run` refuses them with the settings' errors, before it starts."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    errors: list[str] = []
    try:
        if not exporter_names(env):
            return []
    except TracingConfigError as e:
        errors.append(str(e))
    try:
        sampling_from_env(env)
    except TracingConfigError as e:
        errors.append(str(e))
    return errors


def tracing_from_env(env: Mapping[str, str] | None = None) -> ProcessSpanSink | None:
    """The pipeline the OTEL_* variables describe (exported from a child process,
    proxy/observe/span_export.py), or None when traces are off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not exporter_names(env):
        return None
    sampling_from_env(env)  # refused here, before a child process starts
    return ProcessSpanSink(env=env)


# --- per connection ---------------------------------------------------------------


@dataclass(slots=True)
class ConnTrace:
    """A connection's span while it lasts (on `Connection.state`, which this observer
    alone uses): the values it is made of, as they came; the attribute names
    are `readable_span`'s. The observer makes one only for a span the sampler
    keeps: a dropped span is its trace context alone (`Connection.trace`).
    Not `recording`: events and attributes are ignored."""

    trace_id_int: int
    span_id: int
    flags: int
    trace_state: TraceState | None
    parent: SpanContext | None
    start: int  # ns since the epoch
    recording: bool
    request: RequestValues
    extra: dict[str, Any] | None = None  # attributes of the rarer steps (refusal, failed handshake …)
    close: CloseValues | None = None
    events: list[SpanEvent] | None = None
    status: SpanStatus | None = None  # None: unset
    ended: bool = False

    @property
    def name(self) -> str:
        return span_name(self.request.route)

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def sampled(self) -> bool:
        return bool(self.flags & TraceFlags.SAMPLED)

    @property
    def trace_id(self) -> str:
        """32 hex digits, as in traceparent, logs and exemplars."""
        return f"{self.trace_id_int:032x}"

    def set(self, attributes: dict[str, Any]) -> None:
        if not self.recording:
            return
        if self.extra is None:
            self.extra = {}
        self.extra.update(attributes)

    def add_event(self, name: str, attributes: dict[str, Any]) -> None:
        if not self.recording:
            return
        if self.events is None:
            self.events = []
        self.events.append(SpanEvent(name, attributes, time.time_ns()))

    def error(self, description: str) -> None:
        self.status = SpanStatus(StatusCode.ERROR.value, description)

    def record(self, end: int) -> Record:
        """The finished span as plain values (what goes to the exporter)."""
        parent, parent_values = self.parent, None
        if parent is not None:
            parent_state = parent.trace_state.to_header() if parent.trace_state else None
            parent_values = new_record(ParentValues, (
                parent.trace_id, parent.span_id, int(parent.trace_flags), parent.is_remote, parent_state,
            ))  # fmt: skip
        state = self.trace_state.to_header() if self.trace_state else None
        return new_record(Record, (
            self.trace_id_int, self.span_id, self.flags, state, parent_values, self.start, end,
            self.request, self.extra, self.close, self.events, self.status,
        ))  # fmt: skip


def span_name(route: str) -> str:
    return f"WebSocket {route}"


def request_attributes(request: RequestValues) -> dict[str, Any]:
    """The span's attributes known when the upgrade request arrives."""
    attributes: dict[str, Any] = {
        "client.address": request.peer,
        "loopwatch.route": request.route,
        "loopwatch.client.key_hash": client_hash(request.key),
    }
    if request.path is not None:
        attributes["url.path"] = request.path  # not the query: it may carry a token
    host = _host(request.authority)
    if host is not None:
        attributes["server.address"] = host
    if request.user_agent is not None:
        attributes["user_agent.original"] = request.user_agent.decode("latin-1")
    return attributes


@functools.cache
def _sdk_span_types() -> tuple[type[Event], type[ReadableSpan]]:
    # The SDK is imported only where spans are built (the exporter process), once.
    from opentelemetry.sdk.trace import Event, ReadableSpan

    return Event, ReadableSpan


def readable_span(record: Record, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """A record as the SDK's ReadableSpan, for its processors and exporters."""
    Event, ReadableSpan = _sdk_span_types()  # noqa: N806 - the SDK's classes
    attributes = request_attributes(record.request)
    if record.extra:
        attributes.update(record.extra)
    close = record.close
    if close is not None:
        attributes["http.response.status_code"] = 101
        attributes["loopwatch.connection.id"] = close.conn_id
        attributes["loopwatch.close.code"] = close.code
        attributes["loopwatch.close.reason"] = close.reason
        attributes["loopwatch.close.initiator"] = close.initiator
        attributes["loopwatch.connection.duration"] = close.duration
        attributes["loopwatch.messages.client_to_upstream"] = close.messages_in
        attributes["loopwatch.messages.upstream_to_client"] = close.messages_out
        attributes["loopwatch.bytes.client_to_upstream"] = close.bytes_in
        attributes["loopwatch.bytes.upstream_to_client"] = close.bytes_out
    parent, parent_context = record.parent, None
    if parent is not None:
        parent_context = SpanContext(
            parent.trace_id, parent.span_id, is_remote=parent.remote, trace_flags=TraceFlags(parent.flags),
            trace_state=TraceState.from_header([parent.trace_state]) if parent.trace_state else None,
        )  # fmt: skip
    context = SpanContext(
        record.trace_id, record.span_id, is_remote=False, trace_flags=TraceFlags(record.flags),
        trace_state=TraceState.from_header([record.trace_state]) if record.trace_state else None,
    )  # fmt: skip
    status = record.status
    return ReadableSpan(
        name=span_name(record.request.route),
        context=context,
        parent=parent_context,
        resource=resource,
        attributes=attributes,
        events=tuple(Event(e.name, e.attributes, timestamp=e.time_ns) for e in record.events or ()),
        kind=SpanKind.SERVER,
        status=_UNSET if status is None else Status(StatusCode(status.code), status.description),
        start_time=record.start,
        end_time=record.end,
        instrumentation_scope=scope,
    )


def request_values(conn: Connection) -> RequestValues:
    """What the upgrade request said, for the span's attributes (the data plane
    reports them in its Attempt, `Connection.plane_trace`)."""
    plane = conn.plane_trace
    if plane is None:
        return new_record(RequestValues, (None, conn.peer, conn.route, conn.key, None, None))
    return new_record(RequestValues, (
        plane.path, conn.peer, conn.route, conn.key, plane.authority, plane.user_agent,
    ))  # fmt: skip


def trace_of(conn: Connection | None) -> ConnTrace | None:
    """The connection's span, if the sampler kept it (None: dropped, or tracing off)."""
    state = conn.state if conn is not None else None
    return state if isinstance(state, ConnTrace) else None


@functools.lru_cache(maxsize=256)  # clients ask for the same few hosts
def _host(authority: bytes | None) -> str | None:
    """The host of a Host header: `example.com:8080` → `example.com`, `[::1]:80` → `::1`."""
    if not authority:
        return None
    text = authority.decode("latin-1")
    host = text[1:].partition("]")[0] if text.startswith("[") else text.partition(":")[0]
    return host or None


class TracingObserver(Observer):
    name = "tracing"

    def __init__(self, sink: Sink, settings: Settings):
        self.sink = sink
        self.propagator = TraceContextTextMapPropagator()
        # Which connections a client has open, and their records (the runtime's
        # LiveView, `bind`): asked only for steps without a connection.
        self.view: LiveView | None = None
        self._ending: list[tuple[ConnTrace, int]] = []  # (span, end time): see _end
        self._armed = False
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self.expose_client_keys = settings.telemetry.expose_client_keys

    def bind(self, view: LiveView | None) -> None:
        """Where to ask which connections a client has open (the runtime calls this)."""
        self.view = view

    # --- lookups -----------------------------------------------------------------

    def open_trace(self, conn_id: object) -> ConnTrace | None:
        """The recorded span of this replica's open connection with this id."""
        trace = trace_of(self.view.connection(conn_id)) if self.view is not None else None
        return trace if trace is not None and trace.recording else None

    def open_traces(self, key: str) -> list[ConnTrace]:
        """The recorded spans of the client's open connections, oldest first."""
        if self.view is None:
            return []
        found = []
        for conn_id in self.view.open_ids(key):
            trace = self.open_trace(conn_id)
            if trace is not None and trace.key == key:  # ids are per replica, the engine's state may not be
                found.append(trace)
        return found

    def _spans(self, conn: Connection | None, key: str) -> list[ConnTrace]:
        if conn is not None and conn.trace is not None and conn.key == key:  # the step's own span
            trace = trace_of(conn)
            return [] if trace is None else [trace]  # None: the sampler dropped it
        return self.open_traces(key)

    # --- hooks -------------------------------------------------------------------

    def on_attempt(self, conn: Connection, event: ev.Attempt, decision: Admit | Reject) -> None:
        # The data plane decided the span's context itself at the attempt (and
        # sent its traceparent upstream): the span is made with exactly its ids
        # (`plane`; None only when its Attempt carried none).
        plane = conn.plane_trace
        context, parent = _ROOT, None  # a root span, unless the client sent a trace context
        carrier: dict[str, str] | None = None
        if plane is not None and plane.parent_span_id is not None:  # the client's, as the plane read it
            carrier = {"traceparent": f"00-{plane.trace_id:032x}-{plane.parent_span_id:016x}-{plane.parent_flags:02x}"}
            if plane.tracestate is not None:
                carrier["tracestate"] = plane.tracestate
        if carrier is not None:
            context = self.propagator.extract(carrier, context=_ROOT)
            remote = get_current_span(context).get_span_context()
            if remote.is_valid:
                parent = remote
        request: RequestValues | None = None  # built only for a span that records

        # What Tracer.start_span decides, in the same order and with the same parts.
        sink = self.sink
        recording, extra, trace_state = True, None, None
        if plane is not None:  # the data plane's ids (random: it draws them itself)
            trace_id, span_id = plane.trace_id, plane.span_id
            random_id = parent.trace_flags.random_trace_id if parent is not None else True
        elif parent is None:
            trace_id, span_id = sink.new_ids()
            random_id = sink.random_trace_ids
        else:
            trace_id, span_id = parent.trace_id, sink.ids.generate_span_id()
            random_id = parent.trace_flags.random_trace_id
        root_bound = sink.root_bound if parent is None else None
        if root_bound is not None:  # the SDK's sampler, decided as it would
            if trace_id & 0xFFFF_FFFF_FFFF_FFFF < root_bound:
                flags = TraceFlags.SAMPLED
            else:
                flags, recording = TraceFlags.DEFAULT, False
        else:
            attributes: dict[str, Any] = {}
            if sink.sampler_reads_attributes:
                request = request_values(conn)
                attributes = request_attributes(request)
            name = span_name(conn.route)
            sampling = sink.sampler.should_sample(context, trace_id, name, SpanKind.SERVER, attributes)
            flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
            trace_state = sampling.trace_state
            recording = sampling.decision.is_recording()
            # The SDK's samplers hand back a view of `attributes`; keep what a sampler added.
            added = {k: v for k, v in sampling.attributes.items() if k not in attributes or attributes[k] != v}
            extra = added or None
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        conn.trace = new_record(TraceContext, (trace_id, span_id, bool(flags & SAMPLED)))
        trace = None
        if recording:  # a span the sampler dropped is its trace context alone: no ConnTrace
            if request is None:
                request = request_values(conn)
            start = time.time_ns()
            if plane is not None:  # the attempt came a little earlier, through the queue
                start -= max(0, int((time.monotonic() - conn.t0) * 1e9))
            trace = ConnTrace(trace_id, span_id, flags, trace_state, parent, start, recording, request, extra)
            conn.state = trace
            if self.expose_client_keys:
                trace.set({"loopwatch.client.key": conn.key})
        if isinstance(decision, Reject):  # never sent upstream: no traceparent
            if trace is None:
                return
            trace.set({"loopwatch.refusal.reason": decision.reason, "loopwatch.refusal.retry_after": decision.retry_after})
            refusal = conn.refusal  # how the brain answers it, on the record
            if refusal is not None:
                trace.set({"http.response.status_code": refusal.answer_status})
                if refusal.close_code is not None:
                    trace.set({"loopwatch.close.code": refusal.close_code, "loopwatch.close.reason": refusal.message})
            return
        if trace is not None and decision.would_reject is not None:
            trace.set({"loopwatch.would_reject": decision.would_reject.reason})

    def on_rejected(self, conn: Connection, event: ev.Rejected) -> None:
        self._end(trace_of(conn))

    def on_handshake_failed(self, conn: Connection, event: ev.HandshakeFailed) -> None:
        trace = trace_of(conn)
        if trace is None:
            return
        if event.status is not None:
            trace.set({"http.response.status_code": event.status})
            if event.status >= 500:
                trace.error(f"upstream answered {event.status}")
        else:
            answered = handshake_status(None, event.error)  # loopwatch's own 502, 503, 504
            fields: dict[str, Any] = {"error.type": event.error or "unknown"}
            if answered is not None:
                fields["http.response.status_code"] = answered
            trace.set(fields)
            if event.error != "client_closed":
                trace.error(f"upstream handshake: {event.error}")
        self._end(trace)

    def on_closed(self, conn: Connection, event: ev.Closed, stats: RelayStats) -> None:
        trace = conn.state
        if type(trace) is not ConnTrace or not trace.recording:  # a dropped span: nothing to end
            return
        trace.close = new_record(CloseValues, (
            conn.conn_id, event.code, event.reason, event.initiator, event.duration,
            stats.messages_in, stats.messages_out, stats.bytes_in, stats.bytes_out,
        ))  # fmt: skip
        if event.code in ERROR_CODES:
            trace.error(f"closed {event.code} {event.reason}".rstrip())
        self._end(trace)

    def on_outcome(self, outcome: Outcome, t: float, conn: Connection | None = None) -> None:
        for finding in outcome.raised:
            attrs: dict[str, Any] = {
                "loopwatch.rule": finding.rule,
                "loopwatch.severity": finding.severity,
                "loopwatch.evidence": json.dumps(dict(finding.evidence), default=str, sort_keys=True),
            }
            for trace in self._spans(conn, finding.key):
                trace.add_event("loopwatch.finding", attrs)
        for finding in outcome.cleared:
            for trace in self._spans(conn, finding.key):
                trace.add_event("loopwatch.finding_cleared", {"loopwatch.rule": finding.rule})
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                attrs = {
                    "loopwatch.rule": action.rule,
                    "loopwatch.cooldown.duration": action.duration,
                    "loopwatch.cooldown.repeat": action.repeat,
                    "loopwatch.cooldown.enforced": action.enforced,
                }
                for trace in self._spans(conn, action.key):
                    trace.add_event("loopwatch.cooldown", attrs)
            elif isinstance(action, CloseConnection):
                target = self.open_trace(action.conn_id)
                if target is not None:
                    target.add_event(
                        "loopwatch.close_connection",
                        {"loopwatch.close.code": action.code, "loopwatch.close.reason": action.reason},
                    )
            elif isinstance(action, WouldReject):
                current = trace_of(conn)
                if current is not None and conn is not None and conn.key == action.key:
                    current.add_event("loopwatch.would_reject", {"loopwatch.refusal.reason": action.reason})
            elif isinstance(action, BreakerTransition):
                current = trace_of(conn)
                if current is not None:  # the step whose outcome moved the breaker
                    current.add_event(
                        "loopwatch.breaker_transition",
                        {
                            "loopwatch.breaker": action.name,
                            "loopwatch.breaker.route": action.route,
                            "loopwatch.breaker.from": action.from_state,
                            "loopwatch.breaker.to": action.to_state,
                        },
                    )

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        self.reconfigure(settings)

    # --- ending ------------------------------------------------------------------

    def _end(self, trace: ConnTrace | None) -> None:
        """End the span at this instant; hand it to the sink a little later, with
        the others that ended meanwhile. Later, because the gate shows observers
        the engine's outcome of this very step (a finding, a cooldown) right
        after, and its events belong on this span; in batches, because one timer
        per FLUSH_DELAY costs less than a callback per connection."""
        if trace is None or trace.ended:
            return
        trace.ended = True
        if not trace.recording:  # nothing to export
            return
        self._ending.append((trace, time.time_ns()))
        if not self._armed:
            try:
                asyncio.get_running_loop().call_later(FLUSH_DELAY, self._on_timer)
            except RuntimeError:  # no loop (replay, unit tests): nothing more will come
                self.flush()
                return
            self._armed = True

    def _on_timer(self) -> None:
        self._armed = False
        self.flush()

    def flush(self) -> None:
        """Hand every ended span to the sink now (also at shutdown)."""
        ending, self._ending = self._ending, []
        if ending:
            self.sink.submit([trace.record(end) for trace, end in ending])


@functools.lru_cache(maxsize=8192)  # a looping client reconnects with the same key
def client_hash(key: str) -> str:
    """A client key's pseudonym in metrics and traces: 16 hex digits of its SHA-256.
    Stable across replicas and restarts, so one client is one series everywhere.
    A pseudonym, not anonymity: an IP-address key can be found by trying addresses."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


__all__ = [
    "EXPORTERS",
    "SAMPLED",
    "ConnTrace",
    "ProcessSpanSink",
    "Sink",
    "SpanSink",
    "TracingConfigError",
    "tracing_env_errors",
    "TracingObserver",
    "client_hash",
    "exporters_from_env",
    "make_tracing",
    "Record",
    "readable_span",
    "request_attributes",
    "trace_of",
    "tracing_from_env",
]
