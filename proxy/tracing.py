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
the request forwarded upstream so the backend's trace joins it, collects
attributes and span events (findings, enforcement) as the connection goes,
and hands the finished span to the SDK's span processors at the end.

Why not `Tracer.start_span`: a connection span is never made current, never
has children in this process, and is fully known only at its close, so the
SDK's live `Span` (a lock, bounded attribute maps validated per call, a copy
into a ReadableSpan at the end) is pure overhead here. Measured in the
proxy under handshake load it cost ~90 µs of CPU per connection, a quarter
of a whole handshake; building the `ReadableSpan` once at the end costs a
fraction of that (docs/performance.md, "Telemetry overhead"). Sampling, ids,
resource, processors and exporters stay the SDK's own.
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

from detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from detectors.decisions import Reject
from proxy import __version__
from proxy.guard import refusal_for
from proxy.observers import Observer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace.span import TraceState

    from detectors import events as ev
    from detectors.decisions import Admit, Outcome
    from proxy.config import Settings
    from proxy.gate import Attempt, RelayStats

EXPORTERS = ("none", "console", "otlp")
# Closes that mean something broke rather than that someone said goodbye.
ERROR_CODES = frozenset({1006, 1011, 1014})
_ROOT = Context()  # what a span without a remote parent is sampled against
_UNSET = Status(StatusCode.UNSET)
SAMPLED = int(TraceFlags.SAMPLED)  # the flag bit, for hot-path checks
FLUSH_DELAY = 0.05  # seconds an ended span waits to be handed to the processors


class TracingConfigError(ValueError):
    """An OTEL_* variable loopwatch cannot honour; the message names it."""


# --- the SDK pipeline -------------------------------------------------------------


def exporters_from_env(env: Mapping[str, str]) -> list[SpanExporter]:
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: expected none, console or otlp (comma-separated), got {unknown[0]!r}"
        )
    if "none" in names:
        return []
    out: list[SpanExporter] = []
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(var)
            if protocol is not None:
                if protocol.strip().lower() != "http/protobuf":
                    raise TracingConfigError(
                        f"{var}: loopwatch exports OTLP over http/protobuf only, got {protocol!r}"
                    )
                break
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        out.append(OTLPSpanExporter())  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        out.append(ConsoleSpanExporter())
    return out


class SpanSink:
    """Where finished spans go, and what decides about new ones: the SDK's
    resource, sampler and id generator (as a TracerProvider resolves them from
    the environment) and its span processors, one per exporter (batching: the
    event loop never waits on an export)."""

    def __init__(self, exporters: list[SpanExporter], *, batch: bool = True):
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        # service.name defaults to loopwatch; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
        from_env = OTELResourceDetector().detect().attributes
        resource = Resource.create({"service.name": "loopwatch", "service.version": __version__, **from_env})
        # Only to resolve OTEL_TRACES_SAMPLER (default parentbased_always_on) and the
        # id generator exactly as the SDK does; spans never go through its tracers.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.resource = provider.resource
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        # always_on and parentbased_always_on (the default) sample every root span
        # with exactly the attributes given and no trace state: no call needed.
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, DEFAULT_ON

        self.roots_always_on = self.sampler is ALWAYS_ON or self.sampler is DEFAULT_ON
        self.scope = InstrumentationScope("loopwatch", __version__)
        self.processors: list[SpanProcessor] = [
            BatchSpanProcessor(e) if batch else SimpleSpanProcessor(e) for e in exporters
        ]

    def emit(self, span: ReadableSpan) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self) -> None:
        for processor in self.processors:
            processor.shutdown()


def make_tracing(exporters: list[SpanExporter], *, batch: bool = True) -> SpanSink:
    return SpanSink(exporters, batch=batch)


def tracing_from_env(env: Mapping[str, str] | None = None) -> SpanSink | None:
    """The pipeline the OTEL_* variables describe, or None when traces are off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = exporters_from_env(env)
    return SpanSink(exporters) if exporters else None


# --- per connection ---------------------------------------------------------------


@dataclass(slots=True)
class ConnTrace:
    """A connection's span while it lasts (on `Attempt.state`). `attributes` is None
    when the sampler does not record it: then only the trace context exists."""

    name: str
    trace_id_int: int
    span_id: int
    flags: int
    trace_state: TraceState | None
    parent: SpanContext | None
    start: int  # ns since the epoch
    attributes: dict[str, Any] | None
    events: list[Event] | None = None
    status: Status = _UNSET
    conn_id: int = 0
    ended: bool = False

    @property
    def sampled(self) -> bool:
        return bool(self.flags & TraceFlags.SAMPLED)

    @property
    def trace_id(self) -> str:
        """32 hex digits, as in traceparent, logs and exemplars."""
        return f"{self.trace_id_int:032x}"

    def set(self, attributes: dict[str, Any]) -> None:
        if self.attributes is not None:
            self.attributes.update(attributes)

    def add_event(self, name: str, attributes: dict[str, Any]) -> None:
        if self.attributes is None:
            return
        from opentelemetry.sdk.trace import Event

        if self.events is None:
            self.events = []
        self.events.append(Event(name, attributes))

    def readable(self, end: int, sink: SpanSink) -> ReadableSpan:
        from opentelemetry.sdk.trace import ReadableSpan

        context = SpanContext(
            self.trace_id_int, self.span_id, is_remote=False,
            trace_flags=TraceFlags(self.flags), trace_state=self.trace_state,
        )  # fmt: skip
        return ReadableSpan(
            name=self.name,
            context=context,
            parent=self.parent,
            resource=sink.resource,
            attributes=self.attributes,
            events=tuple(self.events or ()),
            kind=SpanKind.SERVER,
            status=self.status,
            start_time=self.start,
            end_time=end,
            instrumentation_scope=sink.scope,
        )


def trace_of(conn: Attempt | None) -> ConnTrace | None:
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

    def __init__(self, sink: SpanSink, settings: Settings):
        self.sink = sink
        self.propagator = TraceContextTextMapPropagator()
        # Open connections, for findings and actions that come without one
        # (wake-ups: a duplicate_connections finding, a close-oldest).
        self.by_id: dict[int, ConnTrace] = {}
        self.by_key: dict[str, dict[int, ConnTrace]] = {}
        self._ending: list[tuple[ConnTrace, int]] = []  # (span, end time): see _end
        self._armed = False
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self.expose_client_keys = settings.telemetry.expose_client_keys
        self.reject_with = settings.policy.reject_with

    # --- lookups for the other observers ---------------------------------------

    def trace_for(self, conn: Attempt | None, key: str | None = None) -> ConnTrace | None:
        """The trace of the step's connection, or (without one, or when `key` is
        another client's) of an open connection of `key`."""
        trace = trace_of(conn)
        if trace is not None and (key is None or conn.key == key):  # type: ignore[union-attr]
            return trace
        if key is None:
            return None
        return next(iter(self.by_key.get(key, {}).values()), None)

    def _spans(self, conn: Attempt | None, key: str) -> list[ConnTrace]:
        trace = trace_of(conn)
        if trace is not None and conn.key == key:  # type: ignore[union-attr]
            return [trace]
        return list(self.by_key.get(key, {}).values())

    # --- hooks -------------------------------------------------------------------

    def on_attempt(self, conn: Attempt, event: ev.Attempt, decision: Admit | Reject) -> None:
        head = conn.head
        # Lookups in the head's header index (duplicates joined with ", ", which
        # is how W3C says to combine several tracestate headers).
        context, parent = _ROOT, None  # a root span, unless the client sent a trace context
        traceparent = head.get(b"traceparent")
        if traceparent is not None:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            tracestate = head.get(b"tracestate")
            if tracestate is not None:
                carrier["tracestate"] = tracestate.decode("latin-1")
            context = self.propagator.extract(carrier, context=_ROOT)
            remote = get_current_span(context).get_span_context()
            if remote.is_valid:
                parent = remote
        attributes: dict[str, Any] = {
            "url.path": head.path,  # not the query: it may carry a token
            "client.address": conn.peer,
            "loopwatch.route": conn.route,
            "loopwatch.client.key_hash": client_hash(conn.key),
        }
        agent = head.get(b"user-agent")
        host = _host(head.authority)
        if host is not None:
            attributes["server.address"] = host
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        if self.expose_client_keys:
            attributes["loopwatch.client.key"] = conn.key

        # What Tracer.start_span decides, in the same order and with the same parts.
        sink = self.sink
        name = f"WebSocket {conn.route}"
        recorded: dict[str, Any] | None = attributes
        trace_state = None
        if parent is None:
            trace_id = sink.ids.generate_trace_id()
            random_id = sink.ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_id = parent.trace_flags.random_trace_id
        if parent is None and sink.roots_always_on:
            flags = TraceFlags.SAMPLED
        else:
            sampling = sink.sampler.should_sample(context, trace_id, name, SpanKind.SERVER, attributes)
            flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
            trace_state = sampling.trace_state
            if not sampling.decision.is_recording():
                recorded = None
            elif len(sampling.attributes) != len(attributes):
                # The SDK's samplers hand back a view of `attributes`; copy only
                # when a sampler added its own.
                recorded = dict(sampling.attributes)
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        trace = ConnTrace(
            name, trace_id, sink.ids.generate_span_id(), flags, trace_state, parent, time.time_ns(), recorded
        )
        conn.state = trace
        if isinstance(decision, Reject):
            refusal = refusal_for(decision, self.reject_with)
            trace.set(
                {
                    "http.response.status_code": 101 if refusal.how == "close-1013" else refusal.status,
                    "loopwatch.refusal.reason": decision.reason,
                    "loopwatch.refusal.retry_after": decision.retry_after,
                }
            )
            if refusal.how == "close-1013":
                trace.set({"loopwatch.close.code": 1013, "loopwatch.close.reason": refusal.message})
            return
        headers = conn.extra_headers if conn.extra_headers is not None else []
        headers.append((b"traceparent", f"00-{trace_id:032x}-{trace.span_id:016x}-{flags:02x}".encode()))
        if trace_state:
            headers.append((b"tracestate", trace_state.to_header().encode("latin-1")))
        conn.extra_headers = headers
        if decision.would_reject is not None:
            trace.set({"loopwatch.would_reject": decision.would_reject.reason})

    def on_rejected(self, conn: Attempt, event: ev.Rejected) -> None:
        self._end(trace_of(conn))

    def on_handshake_failed(self, conn: Attempt, event: ev.HandshakeFailed) -> None:
        trace = trace_of(conn)
        if trace is None:
            return
        if event.status is not None:
            trace.set({"http.response.status_code": event.status})
            if event.status >= 500:
                trace.status = Status(StatusCode.ERROR, f"upstream answered {event.status}")
        else:
            trace.set({"error.type": event.error or "unknown"})
            if event.error != "client_closed":
                trace.status = Status(StatusCode.ERROR, f"upstream handshake: {event.error}")
        self._end(trace)

    def on_opened(self, conn: Attempt, event: ev.Opened) -> None:
        trace = conn.state
        if type(trace) is not ConnTrace:
            return
        trace.conn_id = conn.conn_id
        self.by_id[conn.conn_id] = trace
        self.by_key.setdefault(conn.key, {})[conn.conn_id] = trace

    def on_closed(self, conn: Attempt, event: ev.Closed, stats: RelayStats) -> None:
        trace = conn.state
        if type(trace) is not ConnTrace:
            return
        self.by_id.pop(conn.conn_id, None)
        same_key = self.by_key.get(conn.key)
        if same_key is not None:
            same_key.pop(conn.conn_id, None)
            if not same_key:
                del self.by_key[conn.key]
        attributes = trace.attributes
        if attributes is not None:
            attributes["http.response.status_code"] = 101
            attributes["loopwatch.connection.id"] = conn.conn_id
            attributes["loopwatch.close.code"] = event.code
            attributes["loopwatch.close.reason"] = event.reason
            attributes["loopwatch.close.initiator"] = event.initiator
            attributes["loopwatch.connection.duration"] = event.duration
            attributes["loopwatch.messages.client_to_upstream"] = stats.messages_in
            attributes["loopwatch.messages.upstream_to_client"] = stats.messages_out
            attributes["loopwatch.bytes.client_to_upstream"] = stats.bytes_in
            attributes["loopwatch.bytes.upstream_to_client"] = stats.bytes_out
        if event.code in ERROR_CODES:
            trace.status = Status(StatusCode.ERROR, f"closed {event.code} {event.reason}".rstrip())
        self._end(trace)

    def on_outcome(self, outcome: Outcome, t: float, conn: Attempt | None = None) -> None:
        for finding in outcome.raised:
            attrs = {
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
                target = self.by_id.get(action.conn_id)  # type: ignore[arg-type]
                if target is not None:
                    target.add_event(
                        "loopwatch.close_connection",
                        {"loopwatch.close.code": action.code, "loopwatch.close.reason": action.reason},
                    )
            elif isinstance(action, WouldReject):
                trace = trace_of(conn)
                if trace is not None and conn.key == action.key:  # type: ignore[union-attr]
                    trace.add_event("loopwatch.would_reject", {"loopwatch.refusal.reason": action.reason})
            elif isinstance(action, BreakerTransition):
                trace = trace_of(conn)
                if trace is not None:  # the step whose outcome moved the breaker
                    trace.add_event(
                        "loopwatch.breaker_transition",
                        {
                            "loopwatch.breaker": action.name,
                            "loopwatch.breaker.from": action.from_state,
                            "loopwatch.breaker.to": action.to_state,
                        },
                    )

    def on_config(self, settings: Settings, info: dict[str, Any]) -> None:
        self.reconfigure(settings)

    # --- ending ------------------------------------------------------------------

    def _end(self, trace: ConnTrace | None) -> None:
        """End the span at this instant; hand it to the processors a little later,
        with the others that ended meanwhile. Later, because the gate shows
        observers the engine's outcome of this very step (a finding, a cooldown)
        right after, and its events belong on this span; in batches, because one
        timer per FLUSH_DELAY costs less than a callback per connection."""
        if trace is None or trace.ended:
            return
        trace.ended = True
        if trace.attributes is None:  # not recorded: nothing to export
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
        """Hand every ended span to the processors now (also at shutdown)."""
        ending, self._ending = self._ending, []
        sink = self.sink
        processors = sink.processors
        for trace, end in ending:
            span = trace.readable(end, sink)
            for processor in processors:
                processor.on_end(span)


@functools.lru_cache(maxsize=8192)  # a looping client reconnects with the same key
def client_hash(key: str) -> str:
    """A client key's pseudonym in metrics and traces: 16 hex digits of its SHA-256.
    Stable across replicas and restarts, so one client is one series everywhere.
    A pseudonym, not anonymity: an IP-address key can be found by trying addresses."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def trace_id_of(tracing: TracingObserver | None, conn: Attempt | None, key: str | None = None) -> str | None:
    """The trace id for a log line about this step (sampled or not: it still joins
    the backend's logs, which got the same traceparent)."""
    if tracing is None:
        return None
    trace = tracing.trace_for(conn, key)
    return None if trace is None else trace.trace_id


__all__ = [
    "SAMPLED",
    "ConnTrace",
    "SpanSink",
    "TracingConfigError",
    "TracingObserver",
    "client_hash",
    "make_tracing",
    "trace_id_of",
    "trace_of",
    "tracing_from_env",
]
