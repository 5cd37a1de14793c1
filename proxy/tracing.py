"""OpenTelemetry traces: one span per WebSocket connection, upgrade to close.

The tracer provider is configured by the standard variables, read by the SDK
itself: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`
(+ `_ARG`), `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` / `_HEADERS` / `_TIMEOUT`,
`OTEL_BSP_*`. `OTEL_TRACES_EXPORTER` picks the exporters (`none`, the
default, `console`, `otlp` over HTTP/protobuf; comma-separated for several);
with `none` there is no provider, no span and no cost.

`TracingObserver` starts the span when the upgrade request arrives (as a child
of the client's `traceparent` when it sent one), injects the span's own
`traceparent` into the request forwarded upstream so the backend's trace
joins it, adds span events for the engine's findings and enforcement, and
ends the span at the close, the refusal or the failed handshake. docs/tracing.md
lists every attribute and event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from detectors.actions import BreakerTransition, CloseConnection, CooldownStarted, WouldReject
from detectors.decisions import Reject
from proxy import __version__
from proxy.guard import refusal_for
from proxy.observers import Observer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from detectors import events as ev
    from detectors.decisions import Admit, Outcome
    from proxy.config import Settings
    from proxy.gate import Attempt, RelayStats

EXPORTERS = ("none", "console", "otlp")
# Closes that mean something broke rather than that someone said goodbye.
ERROR_CODES = frozenset({1006, 1011, 1014})


class TracingConfigError(ValueError):
    """An OTEL_* variable loopwatch cannot honour; the message names it."""


# --- the provider -----------------------------------------------------------------


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


def make_provider(exporters: list[SpanExporter], *, batch: bool = True) -> TracerProvider:
    """A provider with loopwatch's resource and the env's sampler, exporting to each
    exporter (through a BatchSpanProcessor: the event loop never waits on export)."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    # service.name defaults to loopwatch; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
    from_env = OTELResourceDetector().detect().attributes
    resource = Resource.create({"service.name": "loopwatch", "service.version": __version__, **from_env})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, default parentbased_always_on
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def provider_from_env(env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """The provider the OTEL_* variables describe, or None when traces are off."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = exporters_from_env(env)
    return make_provider(exporters) if exporters else None


# --- per connection ---------------------------------------------------------------


@dataclass(slots=True)
class ConnTrace:
    """What the tracing observer keeps on `Attempt.state`."""

    span: Span
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    sampled: bool
    conn_id: int = 0
    ended: bool = False


def trace_of(conn: Attempt | None) -> ConnTrace | None:
    state = conn.state if conn is not None else None
    return state if isinstance(state, ConnTrace) else None


def _host_port(authority: bytes | None) -> tuple[str | None, int | None]:
    if not authority:
        return None, None
    text = authority.decode("latin-1")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    return host or None, int(port) if port.isdigit() else None


class TracingObserver(Observer):
    name = "tracing"

    def __init__(self, provider: TracerProvider, settings: Settings):
        self.tracer = provider.get_tracer("loopwatch", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # Open connections, for findings and actions that come without one
        # (wake-ups: a duplicate_connections finding, a close-oldest).
        self.by_id: dict[int, ConnTrace] = {}
        self.by_key: dict[str, dict[int, ConnTrace]] = {}
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
        parent = Context()  # a root span, unless the client sent a trace context
        incoming = head.get(b"traceparent")
        if incoming is not None:
            carrier = {"traceparent": incoming.decode("latin-1")}
            state = head.get(b"tracestate")
            if state is not None:
                carrier["tracestate"] = state.decode("latin-1")
            parent = self.propagator.extract(carrier, context=parent)
        host, port = _host_port(head.authority)
        attributes: dict[str, Any] = {
            "http.request.method": head.method,
            "url.path": head.path,  # not the query: it may carry a token
            "client.address": conn.peer,
            "loopwatch.route": conn.route,
            "loopwatch.client.key_hash": client_hash(conn.key),
        }
        if host is not None:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        agent = head.get(b"user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent.decode("latin-1")
        if self.expose_client_keys:
            attributes["loopwatch.client.key"] = conn.key
        span = self.tracer.start_span(
            f"WebSocket {conn.route}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        ctx = span.get_span_context()
        trace = ConnTrace(span, format_trace_id(ctx.trace_id), format_span_id(ctx.span_id), ctx.trace_flags.sampled)
        conn.state = trace
        if isinstance(decision, Reject):
            refusal = refusal_for(decision, self.reject_with)
            span.set_attributes(
                {
                    "http.response.status_code": 101 if refusal.how == "close-1013" else refusal.status,
                    "loopwatch.refusal.reason": decision.reason,
                    "loopwatch.refusal.retry_after": decision.retry_after,
                }
            )
            if refusal.how == "close-1013":
                span.set_attributes({"loopwatch.close.code": 1013, "loopwatch.close.reason": refusal.message})
            return
        headers = conn.extra_headers if conn.extra_headers is not None else []
        headers.append((b"traceparent", f"00-{trace.trace_id}-{trace.span_id}-{int(ctx.trace_flags):02x}".encode()))
        if ctx.trace_state:
            headers.append((b"tracestate", ctx.trace_state.to_header().encode("latin-1")))
        conn.extra_headers = headers
        if decision.would_reject is not None:
            span.set_attribute("loopwatch.would_reject", decision.would_reject.reason)

    def on_rejected(self, conn: Attempt, event: ev.Rejected) -> None:
        self._end(trace_of(conn))

    def on_handshake_failed(self, conn: Attempt, event: ev.HandshakeFailed) -> None:
        trace = trace_of(conn)
        if trace is None:
            return
        span = trace.span
        if event.status is not None:
            span.set_attribute("http.response.status_code", event.status)
            if event.status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"upstream answered {event.status}"))
        else:
            span.set_attribute("error.type", event.error or "unknown")
            if event.error != "client_closed":
                span.set_status(Status(StatusCode.ERROR, f"upstream handshake: {event.error}"))
        self._end(trace)

    def on_opened(self, conn: Attempt, event: ev.Opened) -> None:
        trace = trace_of(conn)
        if trace is None:
            return
        trace.conn_id = conn.conn_id
        trace.span.set_attributes(
            {"http.response.status_code": 101, "loopwatch.connection.id": conn.conn_id}
        )
        self.by_id[conn.conn_id] = trace
        self.by_key.setdefault(conn.key, {})[conn.conn_id] = trace

    def on_closed(self, conn: Attempt, event: ev.Closed, stats: RelayStats) -> None:
        trace = trace_of(conn)
        if trace is None:
            return
        self.by_id.pop(conn.conn_id, None)
        same_key = self.by_key.get(conn.key)
        if same_key is not None:
            same_key.pop(conn.conn_id, None)
            if not same_key:
                del self.by_key[conn.key]
        span = trace.span
        span.set_attributes(
            {
                "loopwatch.close.code": event.code,
                "loopwatch.close.reason": event.reason,
                "loopwatch.close.initiator": event.initiator,
                "loopwatch.connection.duration": event.duration,
                "loopwatch.messages.client_to_upstream": stats.messages_in,
                "loopwatch.messages.upstream_to_client": stats.messages_out,
                "loopwatch.bytes.client_to_upstream": stats.bytes_in,
                "loopwatch.bytes.upstream_to_client": stats.bytes_out,
            }
        )
        if event.code in ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, f"closed {event.code} {event.reason}".rstrip()))
        self._end(trace)

    def on_outcome(self, outcome: Outcome, t: float, conn: Attempt | None = None) -> None:
        for finding in outcome.raised:
            attrs = {
                "loopwatch.rule": finding.rule,
                "loopwatch.severity": finding.severity,
                "loopwatch.evidence": json.dumps(dict(finding.evidence), default=str, sort_keys=True),
            }
            for trace in self._spans(conn, finding.key):
                trace.span.add_event("loopwatch.finding", attrs)
        for finding in outcome.cleared:
            for trace in self._spans(conn, finding.key):
                trace.span.add_event("loopwatch.finding_cleared", {"loopwatch.rule": finding.rule})
        for action in outcome.actions:
            if isinstance(action, CooldownStarted):
                attrs = {
                    "loopwatch.rule": action.rule,
                    "loopwatch.cooldown.duration": action.duration,
                    "loopwatch.cooldown.repeat": action.repeat,
                    "loopwatch.cooldown.enforced": action.enforced,
                }
                for trace in self._spans(conn, action.key):
                    trace.span.add_event("loopwatch.cooldown", attrs)
            elif isinstance(action, CloseConnection):
                target = self.by_id.get(action.conn_id)  # type: ignore[arg-type]
                if target is not None:
                    target.span.add_event(
                        "loopwatch.close_connection",
                        {"loopwatch.close.code": action.code, "loopwatch.close.reason": action.reason},
                    )
            elif isinstance(action, WouldReject):
                trace = trace_of(conn)
                if trace is not None and conn.key == action.key:  # type: ignore[union-attr]
                    trace.span.add_event("loopwatch.would_reject", {"loopwatch.refusal.reason": action.reason})
            elif isinstance(action, BreakerTransition):
                trace = trace_of(conn)
                if trace is not None:  # the step whose outcome moved the breaker
                    trace.span.add_event(
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
        """End the span at this instant, but only once the current loop step is
        over: the gate shows observers the engine's outcome of this very step
        (a finding, a cooldown) right after, and its events belong on this span."""
        if trace is None or trace.ended:
            return
        trace.ended = True
        end = time.time_ns()
        try:
            asyncio.get_running_loop().call_soon(trace.span.end, end)
        except RuntimeError:  # no loop (replay, unit tests): nothing more will come
            trace.span.end(end)


def client_hash(key: str) -> str:
    """A client key's pseudonym in metrics and traces: 16 hex digits of its SHA-256.
    Stable across replicas and restarts, so one client is one series everywhere.
    A pseudonym, not anonymity: an IP-address key can be found by trying addresses."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def exemplar_of(
    tracing: TracingObserver | None, conn: Attempt | None, key: str | None = None
) -> dict[str, str] | None:
    """The exemplar labels for a metric this step touched: the trace id, when the
    connection's span is sampled (an unsampled trace id leads nowhere)."""
    if tracing is None:
        return None
    trace = tracing.trace_for(conn, key)
    if trace is None or not trace.sampled:
        return None
    return {"trace_id": trace.trace_id}


def trace_id_of(tracing: TracingObserver | None, conn: Attempt | None, key: str | None = None) -> str | None:
    """The trace id for a log line about this step (sampled or not: it still joins
    the backend's logs, which got the same traceparent)."""
    if tracing is None:
        return None
    trace = tracing.trace_for(conn, key)
    return None if trace is None else trace.trace_id


__all__ = [
    "ConnTrace",
    "client_hash",
    "TracingConfigError",
    "TracingObserver",
    "exemplar_of",
    "make_provider",
    "provider_from_env",
    "trace_id_of",
    "trace_of",
]
