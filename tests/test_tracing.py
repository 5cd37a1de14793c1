"""OpenTelemetry: a span per connection through the real proxy, traceparent to
the backend, findings and enforcement as span events, refusals as short
spans, the OTEL_* configuration, and the OTLP/HTTP export for real."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import SpanKind, StatusCode
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection

from loopwatch.proxy.admin.server import build_registry
from loopwatch.proxy.app.runtime import start
from loopwatch.proxy.observe.metrics import Telemetry, client_hash
from loopwatch.proxy.observe.tracing import (
    ProcessSpanSink,
    TracingConfigError,
    exporters_from_env,
    make_tracing,
    tracing_env_errors,
    tracing_from_env,
)
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.conftest import free_port, idle, wait_for, websockets_backend
from tests.test_telemetry import (
    OPENMETRICS,
    attempt,
    demo_backend,
    scrape,
    settings_with,
    telemetered,
)

ROOT = Path(__file__).resolve().parent.parent

TRACEPARENT_OF_CLIENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def recording_echo() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An echo backend that records each upgrade request's headers."""
    seen: list[dict[str, str]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for message in ws:
            if message == "bye":
                await ws.close(4000, "bye now")
                return
            await ws.send(message)

    async with websockets_backend(handler) as (url, _):
        yield url, seen


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def parse_traceparent(value: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id, flags


async def test_one_span_per_connection_and_traceparent_upstream() -> None:
    exporter = InMemorySpanExporter()
    async with recording_echo() as (url, seen):
        settings = settings_with(upstream=url)
        async with telemetered(settings, exporter=exporter) as lw:
            async with connect(
                f"ws://127.0.0.1:{lw.proxy_port}/chat?token=secret", compression=None,
                user_agent_header="tab/1.0",
            ) as ws:
                for m in ("a", "bb"):
                    await ws.send(m)
                    assert await ws.recv() == m
                await ws.send("bye")
                with contextlib.suppress(Exception):
                    await ws.recv()
            await wait_for(lambda: idle(lw))
            await wait_for(lambda: len(exporter.get_finished_spans()) == 1)
    (span,) = exporter.get_finished_spans()
    ctx = span.context
    trace_id, parent_id, flags = parse_traceparent(seen[0]["traceparent"])
    # The backend's trace joins the proxy's: same trace, the proxy's span as parent.
    assert trace_id == f"{ctx.trace_id:032x}" and parent_id == f"{ctx.span_id:016x}"
    assert int(flags, 16) & 1  # sampled (bit 2, W3C level 2's "random trace id", may be set too)
    assert span.parent is None  # the client sent no trace context
    assert span.name == "WebSocket /" and span.kind is SpanKind.SERVER
    a = dict(span.attributes or {})
    key = "127.0.0.1"
    assert a == {
        "url.path": "/chat",
        "client.address": "127.0.0.1",
        "server.address": "127.0.0.1",
        "user_agent.original": "tab/1.0",
        "loopwatch.route": "/",
        "loopwatch.client.key_hash": client_hash(key),
        "http.response.status_code": 101,
        "loopwatch.connection.id": 1,
        "loopwatch.close.code": 4000,
        "loopwatch.close.reason": "bye now",
        "loopwatch.close.initiator": "upstream",
        "loopwatch.connection.duration": pytest.approx(a["loopwatch.connection.duration"]),
        "loopwatch.messages.client_to_upstream": 3,
        "loopwatch.messages.upstream_to_client": 2,
        "loopwatch.bytes.client_to_upstream": 6,
        "loopwatch.bytes.upstream_to_client": 3,
    }
    assert 0 < a["loopwatch.connection.duration"] < 10
    assert span.end_time is not None and span.start_time is not None
    assert (span.end_time - span.start_time) / 1e9 >= a["loopwatch.connection.duration"]
    assert span.status.status_code is StatusCode.UNSET
    assert not span.events
    assert "token" not in str(a)  # the query (a token) is never recorded


async def test_client_trace_context_is_the_parent() -> None:
    exporter = InMemorySpanExporter()
    headers = {"traceparent": TRACEPARENT_OF_CLIENT, "tracestate": "vendor=abc"}
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url), exporter=exporter) as lw:
        assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/", ["x"]) == (1000, "")
        async with connect(f"ws://127.0.0.1:{lw.proxy_port}/", additional_headers=headers) as ws:
            await ws.send("y")
            await ws.recv()
        await wait_for(lambda: len(exporter.get_finished_spans()) == 2)
    first, second = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert second.parent is not None
    assert f"{second.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert f"{second.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    # The backend sees exactly one traceparent: the proxy's span, in the client's trace.
    trace_id, parent_id, _ = parse_traceparent(seen[1]["traceparent"])
    assert (trace_id, parent_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", f"{second.context.span_id:016x}")
    assert seen[1]["tracestate"] == "vendor=abc"
    assert list(seen[1]).count("traceparent") == 1
    assert first.context.trace_id != second.context.trace_id


async def echo_once(url: str, headers: dict[str, str]) -> None:
    async with connect(url, additional_headers=headers, compression=None, open_timeout=5) as ws:
        await ws.send("x")
        assert await ws.recv() == "x"


async def test_what_the_client_sent_that_is_no_trace_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traceparent W3C calls invalid starts a new trace (and is not passed on);
    an unsampled parent is continued unsampled by the default parent-based
    sampler and sampled by a ratio sampler, which looks at the trace id only."""
    sent_by_client = [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper-case hex
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  # version 00 goes on
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # a short trace id
    ]
    exporter = InMemorySpanExporter()
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url), exporter=exporter) as lw:
        for value in sent_by_client:
            await echo_once(f"ws://127.0.0.1:{lw.proxy_port}/", {"traceparent": value, "tracestate": "v=1"})
        unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        await echo_once(f"ws://127.0.0.1:{lw.proxy_port}/", {"traceparent": unsampled})
        await wait_for(lambda: idle(lw))
        await wait_for(lambda: len(exporter.get_finished_spans()) == len(sent_by_client))
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    for span, headers, value in zip(spans, seen, sent_by_client, strict=False):
        assert span.parent is None, value  # a root: the client's was no trace context
        trace_id, span_id, flags = parse_traceparent(headers["traceparent"])
        assert (trace_id, span_id) == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
        assert trace_id != "4bf92f3577b34da6a3ce929d0e0e4736" and int(flags, 16) & 1
        assert list(headers).count("traceparent") == 1
        assert headers["tracestate"] == "v=1"  # not the span's: passed as the client sent it
    # The unsampled parent: its trace continued, not sampled, no span exported.
    trace_id, _, flags = parse_traceparent(seen[-1]["traceparent"])
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and not int(flags, 16) & 1

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
    exporter = InMemorySpanExporter()
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url), exporter=exporter) as lw:
        await echo_once(f"ws://127.0.0.1:{lw.proxy_port}/", {"traceparent": unsampled})
        await wait_for(lambda: len(exporter.get_finished_spans()) == 1)
    (span,) = exporter.get_finished_spans()
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    trace_id, span_id, flags = parse_traceparent(seen[0]["traceparent"])
    assert (trace_id, span_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", f"{span.context.span_id:016x}")
    assert int(flags, 16) & 1  # the ratio sampler samples a child by its trace id


@pytest.mark.parametrize("env", [
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    {"OTEL_TRACES_SAMPLER": "always_on"},
], ids=lambda e: ",".join(e.values()))  # fmt: skip
async def test_the_sampled_flag_sent_upstream_is_the_spans(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the sampler, what goes upstream says sampled exactly when the span
    is exported: roots, and children of sampled and unsampled parents."""
    import random

    for var, value in env.items():
        monkeypatch.setenv(var, value)
    rng = random.Random(16)
    parents = [None] * 8 + [
        f"00-{rng.getrandbits(128) | 1:032x}-{rng.getrandbits(64) | 1:016x}-{flags}" for flags in ("01", "00") * 4
    ]
    exporter = InMemorySpanExporter()
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url), exporter=exporter) as lw:
        for parent in parents:
            await echo_once(f"ws://127.0.0.1:{lw.proxy_port}/", {"traceparent": parent} if parent else {})
        await wait_for(lambda: idle(lw))
        assert lw.telemetry is not None and lw.telemetry.tracing is not None
        lw.telemetry.tracing.flush()  # the ended spans to the exporter now (else FLUSH_DELAY after)
    exported = {(s.context.trace_id, s.context.span_id) for s in exporter.get_finished_spans()}
    assert len(seen) == len(parents)
    for parent, headers in zip(parents, seen, strict=True):
        trace_id, span_id, flags = parse_traceparent(headers["traceparent"])
        if parent is not None:
            assert trace_id == parent.split("-")[1]
        assert bool(int(flags, 16) & 1) == ((int(trace_id, 16), int(span_id, 16)) in exported), (parent, flags)


def test_the_native_listener_refuses_a_root_bound_past_every_trace_id() -> None:
    from loopwatch.proxy.dataplane.native import (
        ALL_ROOTS,
        EnforcementTable,
        EventQueue,
        NativeListener,
        TraceSampling,
    )

    for bound in (ALL_ROOTS + 1, -1):
        with pytest.raises((ValueError, OverflowError), match="trace_root_bound|negative|overflow|out of range"):
            NativeListener.start(
                [("/", "ws://127.0.0.1:9")], queue=EventQueue(), table=EnforcementTable(), tracing=TraceSampling(bound),
            )  # fmt: skip


async def test_a_native_reload_keeps_the_trace_sampling_of_the_start() -> None:
    """The sampling comes from the OTEL_* environment at start, outside the
    ListenerConfig a reload swaps: a sampler that samples nothing, not even a
    sampled parent's child, still decides after the reload moved the route."""
    from loopwatch.proxy.dataplane.native import (
        EnforcementTable,
        EventQueue,
        NativeListener,
        TraceSampling,
        listener_config,
    )

    client_trace, client_span = TRACEPARENT_OF_CLIENT.split("-")[1:3]
    async with recording_echo() as (first, seen_first), recording_echo() as (second, seen_second):
        listener = NativeListener.start(
            [("/", first)], queue=EventQueue(), table=EnforcementTable(), threads=1,
            tracing=TraceSampling(0, parent_based=False),
        )  # fmt: skip
        try:
            url = f"ws://127.0.0.1:{listener.port}/"
            await echo_once(url, {"traceparent": TRACEPARENT_OF_CLIENT})
            listener.reload(listener_config([("/", second)]))
            await echo_once(url, {"traceparent": TRACEPARENT_OF_CLIENT})
        finally:
            await asyncio.to_thread(listener.stop, 3.0)
    assert len(seen_first) == len(seen_second) == 1  # the reload moved the route
    for seen in (seen_first, seen_second):
        version, trace_id, span_id, flags = seen[0]["traceparent"].split("-")
        # The client's trace continued with the plane's span, not sampled.
        assert (version, trace_id, flags) == ("00", client_trace, "00")
        assert span_id != client_span


async def test_without_tracing_the_clients_trace_context_passes_untouched() -> None:
    headers = {"traceparent": TRACEPARENT_OF_CLIENT, "tracestate": "vendor=abc"}
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url)) as lw:
        await echo_once(f"ws://127.0.0.1:{lw.proxy_port}/", headers)
    assert seen[0]["traceparent"] == TRACEPARENT_OF_CLIENT and seen[0]["tracestate"] == "vendor=abc"


async def test_loop_spans_carry_findings_and_enforcement() -> None:
    exporter = InMemorySpanExporter()
    async with demo_backend() as backend:
        settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}",
            **{"policy.cooldown.base": "20s", "policy.cooldown.jitter": 0, "telemetry.expose_client_keys": True},
        )
        async with telemetered(settings, exporter=exporter) as lw:
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('tab-42', -60)}"
            seen = [await attempt(url) for _ in range(3)]
            # The engine's cooldown (on native, written to the table in the same batch).
            await wait_for(lambda: getattr(lw.engine.client("tab-42@127.0.0.1", time.monotonic()), "status", "") == "cooldown")
            seen.append(await attempt(url))
            await wait_for(lambda: len(exporter.get_finished_spans()) == 4)
    assert [c for c, _ in seen] == [1008, 1008, 1008, 1013]
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    key = "tab-42@127.0.0.1"
    for span in spans:
        assert span.attributes is not None
        assert span.attributes["loopwatch.client.key"] == key
        assert span.attributes["loopwatch.client.key_hash"] == client_hash(key)
    for span in spans[:3]:
        assert span.attributes["loopwatch.close.code"] == 1008  # type: ignore[index]
        assert span.attributes["loopwatch.close.reason"] == "token expired"  # type: ignore[index]
        assert span.attributes["loopwatch.close.initiator"] == "upstream"  # type: ignore[index]
    assert not spans[0].events and not spans[1].events
    # The third failure raised the finding and started the cooldown: on its span.
    events = {e.name: dict(e.attributes or {}) for e in spans[2].events}
    assert set(events) == {"loopwatch.finding", "loopwatch.cooldown"}
    assert events["loopwatch.finding"]["loopwatch.rule"] == "auth_failure_loop"
    assert events["loopwatch.finding"]["loopwatch.severity"] == "critical"
    assert '"consecutive": 3' in events["loopwatch.finding"]["loopwatch.evidence"]
    assert events["loopwatch.cooldown"] == {
        "loopwatch.rule": "auth_failure_loop",
        "loopwatch.cooldown.duration": 20.0,
        "loopwatch.cooldown.repeat": 1,
        "loopwatch.cooldown.enforced": True,
    }
    # The refused attempt: a short span with the reason, never sent upstream.
    refused = spans[3]
    a = dict(refused.attributes or {})
    assert a["loopwatch.refusal.reason"] == "cooldown"
    assert 19 < a["loopwatch.refusal.retry_after"] <= 20
    assert a["http.response.status_code"] == 101 and a["loopwatch.close.code"] == 1013
    assert a["loopwatch.close.reason"].startswith("loopwatch: cooldown, retry in")
    assert "loopwatch.connection.id" not in a
    assert (refused.end_time or 0) - (refused.start_time or 0) < 0.5e9
    assert backend.upgrades["tab-42"] == 3


async def test_steps_without_a_connection_reach_the_open_spans() -> None:
    """A wake-up's finding (duplicate_connections ages in with no step) and a
    close-oldest (decided on another attempt) land on the spans of the client's
    open connections, found through the listener and the engine; their log lines
    carry those spans' trace ids."""
    from tests.test_logs import captured

    exporter = InMemorySpanExporter()
    async with demo_backend() as backend:
        settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}",
            **{"detection.rules.duplicate_connections.max_connections": 1,
               "detection.rules.duplicate_connections.held_for": "0.2s",
               "policy.max_concurrent": 2, "policy.on_max_concurrent": "close-oldest"},
        )  # fmt: skip
        with captured() as lines:
            async with telemetered(settings, exporter=exporter) as lw:
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('tab-7', 600)}"
                first = await connect(url, compression=None)
                second = await connect(url, compression=None)
                await wait_for(lambda: any(x["event"] == "finding_raised" for x in lines.refresh()))
                third = await connect(url, compression=None)  # one too many: the first is closed
                await wait_for(lambda: first.close_code is not None)
                for ws in (second, third):
                    await ws.close()
                await wait_for(lambda: len(exporter.get_finished_spans()) == 3)
    assert first.close_code == 1008
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    events = [[e.name for e in span.events] for span in spans]
    assert events[0] == ["loopwatch.finding", "loopwatch.close_connection"]
    assert events[1] == ["loopwatch.finding"]
    assert "loopwatch.finding" not in events[2]  # not open when the finding was raised
    closing = dict(spans[0].events[1].attributes or {})
    assert closing["loopwatch.close.code"] == 1008
    trace_ids = [f"{span.context.trace_id:032x}" for span in spans]
    (raised,) = [x for x in lines if x["event"] == "finding_raised"]
    assert raised["rule"] == "duplicate_connections" and raised["trace_id"] == trace_ids[0]
    (closed,) = [x for x in lines if x.get("action") == "close_connection"]
    assert closed["trace_id"] == trace_ids[0]


async def test_http_refusal_and_failed_handshake_spans() -> None:
    exporter = InMemorySpanExporter()
    async with demo_backend() as backend:
        routes = {"/ws": f"ws://127.0.0.1:{backend.port}", "/down": f"ws://127.0.0.1:{free_port()}"}
        settings = settings_with(routes, **{"policy.reject_with": "http-429", "policy.deny": ["127.0.0.1"]})
        async with telemetered(settings, exporter=exporter) as lw:
            assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/ws") == (429, "")
            await wait_for(lambda: len(exporter.get_finished_spans()) == 1)
        (refused,) = exporter.get_finished_spans()
        a = dict(refused.attributes or {})
        assert a["http.response.status_code"] == 429 and a["loopwatch.refusal.reason"] == "deny"
        assert "loopwatch.close.code" not in a

        exporter = InMemorySpanExporter()  # the first one was shut down with its pipeline
        async with telemetered(settings_with(routes), exporter=exporter) as lw:
            assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/down") == (502, "")
            await wait_for(lambda: len(exporter.get_finished_spans()) == 1)
    (failed,) = exporter.get_finished_spans()
    assert failed.name == "WebSocket /down"
    assert failed.attributes is not None and failed.attributes["error.type"] == "connect"
    assert failed.attributes["http.response.status_code"] == 502  # what the client got, loopwatch's
    assert failed.status.status_code is StatusCode.ERROR


async def test_unsampled_spans_still_propagate_but_leave_no_exemplars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    async with recording_echo() as (url, seen), telemetered(settings_with(upstream=url), exporter=exporter) as lw:
        assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/", ["x"]) == (1000, "")
        await wait_for(lambda: idle(lw))
        om, _ = await scrape(lw, OPENMETRICS)
    assert exporter.get_finished_spans() == ()
    _, _, flags = parse_traceparent(seen[0]["traceparent"])
    assert not int(flags, 16) & 1  # not sampled: the backend should not sample either
    assert "# {" not in om  # no exemplar points at a trace nobody kept


# --- configuration from OTEL_* --------------------------------------------------------


def test_tracing_from_env() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER.*'zipkin'"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL.*'grpc'"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    env = {"OTEL_TRACES_EXPORTER": "console, otlp"}
    exporters = sorted(type(e).__name__ for e in exporters_from_env(env))
    assert exporters == ["ConsoleSpanExporter", "OTLPSpanExporter"]
    sink = tracing_from_env(env)
    assert isinstance(sink, ProcessSpanSink)  # the exporters run in a child process
    try:
        assert sink.resource.attributes["service.name"] == "loopwatch"
        assert type(sink.sampler).__name__ == "ParentBased"  # OTEL_TRACES_SAMPLER's default
        assert sink.force_flush(10_000)  # the child is up and answers
    finally:
        sink.shutdown()
    assert sink.child is None  # it exited at the end of its input


def test_span_ids_come_from_the_sdks_generator() -> None:
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    from loopwatch.proxy.observe.span_export import _id_pairs

    pair = _id_pairs(RandomIdGenerator())
    ids = [pair() for _ in range(1000)]
    assert all(0 < t < 2**128 and 0 < s < 2**64 for t, s in ids)
    assert len({t for t, _ in ids}) == len({s for _, s in ids}) == 1000
    # One draw of 192 bits split in two; an all-zero half falls back to the generator.
    draws = iter([5 << 64, 7 << 64 | 9])
    with pytest.MonkeyPatch.context() as m:
        m.setattr("random.getrandbits", lambda bits: next(draws) if bits == 192 else 11)
        assert _id_pairs(RandomIdGenerator())() == (11, 11)  # span half was 0: the SDK's methods
        assert _id_pairs(RandomIdGenerator())() == (7, 9)

    class Counting(IdGenerator):  # an id generator of one's own: its methods, in the SDK's order
        def __init__(self) -> None:
            self.n = 0

        def generate_trace_id(self) -> int:
            self.n += 1
            return 0x100 + self.n

        def generate_span_id(self) -> int:
            self.n += 1
            return self.n

    assert _id_pairs(Counting())() == (0x101, 2)


class OtlpReceiver:
    """A minimal OTLP/HTTP trace receiver: decodes each protobuf export request."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self.traces)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = 0

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        self.headers.append(dict(request.headers))
        self.requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def __aenter__(self) -> OtlpReceiver:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every exported span."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                resource = {kv.key: _any(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((resource, span) for span in ss.spans)
        return out


def _any(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


async def test_otlp_export_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OtlpReceiver() as receiver, recording_echo() as (url, seen):
        for name, val in {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=s3cret",
            "OTEL_SERVICE_NAME": "edge-proxy",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,service.namespace=lw",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }.items():
            monkeypatch.setenv(name, val)
        settings = settings_with(upstream=url)
        telemetry = Telemetry.from_env(settings, build_registry())
        assert telemetry.tracing is not None
        running = await start(settings, telemetry=telemetry)
        try:
            assert await attempt(f"ws://127.0.0.1:{running.proxy_port}/room", ["hello"]) == (1000, "")
            await wait_for(lambda: idle(running))
            await wait_for(lambda: bool(receiver.spans()), timeout=10)
        finally:
            await running.close()  # flushes and shuts the exporter down
        await asyncio.sleep(0)
    ((resource, span),) = receiver.spans()
    assert resource["service.name"] == "edge-proxy"
    assert resource["deployment.environment"] == "test" and resource["service.namespace"] == "lw"
    assert resource["service.version"] == "0.1.0"
    assert receiver.headers[0].get("x-collector-token") == "s3cret"
    assert span.name == "WebSocket /"
    attrs = {kv.key: _any(kv.value) for kv in span.attributes}
    assert attrs["url.path"] == "/room" and attrs["loopwatch.close.code"] == 1000
    assert attrs["loopwatch.messages.client_to_upstream"] == 1
    trace_id, parent_id, _ = parse_traceparent(seen[0]["traceparent"])
    assert span.trace_id.hex() == trace_id and span.span_id.hex() == parent_id


def test_run_and_check_config_refuse_an_otel_setting_run_cannot_honour(tmp_path: Path) -> None:
    """check-config passed (exit 0) what run refused, and run said only the
    first mistake, after its first log line: both now say every one, before
    anything starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH_", "OTEL_"))}
    env["OTEL_TRACES_EXPORTER"] = "otlp"
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "grpc"
    env["OTEL_TRACES_SAMPLER"] = "traceidratio"
    env["OTEL_TRACES_SAMPLER_ARG"] = "2"
    expected = [
        "OTEL_EXPORTER_OTLP_PROTOCOL: loopwatch exports OTLP over http/protobuf only, got 'grpc'",
        "OTEL_TRACES_SAMPLER_ARG: expected a rate from 0 to 1, got '2'",
    ]
    config = tmp_path / "loopwatch.yaml"
    config.write_text('upstream: "ws://127.0.0.1:9"\nlisten: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "loopwatch", "run", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["loopwatch: invalid configuration:", *expected]
    checked = subprocess.run(
        [sys.executable, "-m", "loopwatch", "check-config", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (checked.returncode, checked.stdout, checked.stderr.splitlines()) == (2, "", expected)
    # An exporter it does not know is said with the sampler's mistake; with
    # OTEL_SDK_DISABLED nothing is read.
    env["OTEL_TRACES_EXPORTER"] = "zipkin"
    checked = subprocess.run(
        [sys.executable, "-m", "loopwatch", "check-config", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.stderr.splitlines() == [
        "OTEL_TRACES_EXPORTER: expected none, console or otlp (comma-separated), got 'zipkin'",
        expected[1],
    ]
    env["OTEL_SDK_DISABLED"] = "true"
    checked = subprocess.run(
        [sys.executable, "-m", "loopwatch", "check-config", str(config)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


class PathSampler(Sampler):
    """A sampler of one's own that reads the span's attributes and adds one."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,  # type: ignore[no-untyped-def]
                      trace_state=None) -> SamplingResult:  # fmt: skip
        self.seen.append(dict(attributes or {}))
        keep = str((attributes or {}).get("url.path", "")).startswith("/keep")
        decision = Decision.RECORD_AND_SAMPLE if keep else Decision.DROP
        return SamplingResult(decision, {**(attributes or {}), "sampler.note": "kept"} if keep else None)

    def get_description(self) -> str:
        return "PathSampler"


SAMPLER_ENVS = [
    {}, {"OTEL_TRACES_SAMPLER": "always_on"}, {"OTEL_TRACES_SAMPLER": "always_off"},
    {"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
    {"OTEL_TRACES_SAMPLER": "PARENTBASED_TRACEIDRATIO", "OTEL_TRACES_SAMPLER_ARG": "1"},
    {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"},
    {"OTEL_TRACES_SAMPLER": "traceidratio"},  # the SDK's default rate, 1.0
]  # fmt: skip


@pytest.mark.parametrize("env", SAMPLER_ENVS, ids=lambda e: ",".join(e.values()) or "default")
def test_root_spans_are_sampled_as_the_sdks_samplers_would(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The root decision loopwatch takes from what it parsed of OTEL_TRACES_SAMPLER
    agrees, trace id by trace id, with the sampler the SDK itself builds from the
    same variables (asked through its public should_sample)."""
    import random

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

    from loopwatch.proxy.observe.span_export import sampling_from_env

    for var in ("OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    sdk = TracerProvider(shutdown_on_exit=False).sampler  # the SDK's reading of the same variables
    plan = sampling_from_env(env)
    assert plan.root_bound is not None and not plan.reads_attributes
    rng = random.Random(4)
    ids = [rng.getrandbits(128) or 1 for _ in range(3000)] + [1, 2**64 - 1, 2**128 - 1, 0x1234 << 64]
    for trace_id in ids:
        result = sdk.should_sample(Context(), trace_id, "WebSocket /", SpanKind.SERVER, {"a": 1})
        ours = trace_id & 0xFFFF_FFFF_FFFF_FFFF < plan.root_bound
        assert ours == result.decision.is_sampled() == result.decision.is_recording(), (env, trace_id)
        assert result.trace_state is None or not result.trace_state
        assert (dict(result.attributes or {}) == {"a": 1}) == ours
        mine = plan.sampler.should_sample(Context(), trace_id, "WebSocket /", SpanKind.SERVER, {"a": 1})
        assert mine.decision == result.decision
    assert plan.sampler.get_description() == sdk.get_description()


def test_a_sampler_loopwatch_cannot_honour_is_refused() -> None:
    from loopwatch.proxy.observe.span_export import sampling_from_env

    on = {"OTEL_TRACES_EXPORTER": "otlp"}
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_SAMPLER: .*'xray'"):
        tracing_from_env({**on, "OTEL_TRACES_SAMPLER": "xray"})
    for arg in ("1.5", "-0.1", "half"):
        with pytest.raises(TracingConfigError, match=f"OTEL_TRACES_SAMPLER_ARG: .*'{arg}'"):
            sampling_from_env({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": arg})


def test_no_private_attribute_of_another_library_is_read() -> None:
    """Sampling is decided from loopwatch's own configuration, never by reading the
    SDK's private attributes (`sampler._root` and the like)."""
    import re

    source = "\n".join(
        (ROOT / "proxy" / "observe" / name).read_text() for name in ("tracing.py", "span_export.py")
    )
    assert re.findall(r"\b(?:sampler|sdk|provider|ids|parent|span)\._[a-z]\w*", source) == []
    assert re.findall(r"getattr\([^)]*[\"']_[a-z]", source) == []


async def test_a_sampler_of_ones_own_sees_and_adds_attributes() -> None:
    exporter = InMemorySpanExporter()
    sink = make_tracing([exporter], batch=False)
    sink.sampler = sampler = PathSampler()
    sink.root_bound, sink.sampler_reads_attributes = None, True
    async with recording_echo() as (url, seen):
        telemetry = Telemetry(settings_with(upstream=url), build_registry(), spans=sink)
        running = await start(settings_with(upstream=url), telemetry=telemetry)
        try:
            for path in ("/keep/a", "/drop/b"):
                assert await attempt(f"ws://127.0.0.1:{running.proxy_port}{path}", ["x"]) == (1000, "")
            await wait_for(lambda: idle(running))
        finally:
            await running.close()
    assert [s["url.path"] for s in sampler.seen] == ["/keep/a", "/drop/b"]
    assert sampler.seen[0]["loopwatch.route"] == "/" and "client.address" in sampler.seen[0]
    (span,) = exporter.get_finished_spans()
    assert span.attributes["url.path"] == "/keep/a" and span.attributes["sampler.note"] == "kept"
    sent = [parse_traceparent(h["traceparent"]) for h in seen]
    assert sent[0][:2] == (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}")
    flags = [int(f, 16) & 1 for _, _, f in sent]
    # The data plane sends its traceparent before the brain has asked a sampler
    # of one's own (it never waits for Python): it samples such a span as
    # parentbased_always_on would, and the sampler decides what is recorded
    # (docs/tracing.md, "The native data plane").
    assert flags == [1, 1]


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100"},
         "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: a batch (512) must fit the queue (OTEL_BSP_MAX_QUEUE_SIZE, 100); "
         "set it to 100 or less"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE: expected a whole number from 1 to 1000000, got '0'"),
        ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "lots"},
         "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: expected a whole number from 1 to 1000000, got 'lots'"),
        ({"OTEL_BSP_SCHEDULE_DELAY": "-5"}, "OTEL_BSP_SCHEDULE_DELAY: expected a whole number from 1 to 3600000, got '-5'"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100"}, None),
        ({"OTEL_BSP_EXPORT_TIMEOUT": "0"}, None),  # the SDK takes it
    ],
)  # fmt: skip
def test_the_batch_processors_variables_are_refused_where_the_sdk_would_fail(
    variables: dict[str, str], error: str | None
) -> None:
    """The sinks probe: OTEL_BSP_MAX_QUEUE_SIZE below the SDK's batch of 512
    passed check-config, and the span exporter died at its first span, again
    every second, every span lost and a third of a core spent."""
    env = {"OTEL_TRACES_EXPORTER": "otlp", **variables}
    assert tracing_env_errors(env) == ([] if error is None else [error])
