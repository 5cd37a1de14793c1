"""Prometheus metrics through the real proxy: a scripted session scraped and
checked metric by metric against docs/metrics.md, promtool on the real scrape,
cardinality with 10 000 clients, live message counts folded exactly once,
reloads and observer errors counted."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import generate_latest
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from loopwatch.dashboards import promql
from loopwatch.detectors import events as ev
from loopwatch.detectors.rules import RULE_NAMES
from loopwatch.proxy.admin.server import build_registry
from loopwatch.proxy.app.runtime import ConfigSources, Running, build_gate, start
from loopwatch.proxy.app.settings import Settings, load_settings
from loopwatch.proxy.brain import EngineGate
from loopwatch.proxy.dataplane.boundary import Connection, Refusal
from loopwatch.proxy.observe.metrics import Telemetry, client_hash, code_label, code_labels
from loopwatch.proxy.observe.observers import Observer, Observers
from loopwatch.proxy.observe.tracing import make_tracing
from loopwatch.proxy.tools.demo_backend import DemoBackend, issue_token
from tests.conftest import RawBackend, client_key, free_port, idle, wait_for

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "docs" / "metrics.md"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# The rules a scripted session must not trip by accident: what is asserted exactly
# is auth_failure_loop's finding, cooldown and refusals.

QUIET_RULES = {f"detection.rules.{r}.enabled": False for r in ("rapid_reconnect", "short_lived", "no_backoff")}


# --- helpers shared with test_tracing and test_logs ------------------------------


def settings_with(routes: dict[str, str] | None = None, upstream: str | None = None, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
    if routes is not None:
        base["routes"] = [{"path_prefix": p, "upstream": u} for p, u in routes.items()]
    else:
        base["upstream"] = upstream
    base.update(overrides)
    return load_settings(None, env={}, overrides=base)


@contextlib.asynccontextmanager
async def telemetered(
    settings: Settings,
    *,
    exporter: InMemorySpanExporter | None = None,
    extra: Iterable[Observer] = (),
    sources: ConfigSources | None = None,
) -> AsyncIterator[Running]:
    """A loopwatch with full telemetry; spans go to `exporter` (synchronously)."""
    sink = make_tracing([exporter], batch=False) if exporter is not None else None
    telemetry = Telemetry(settings, build_registry(), spans=sink)
    extra = list(extra)
    gate = build_gate(settings, Observers([*telemetry.observers, *extra])) if extra else None
    running = await start(settings, gate, sources=sources, telemetry=telemetry)
    try:
        yield running
    finally:
        await running.close()
        if sink is not None:
            sink.shutdown()


@contextlib.asynccontextmanager
async def demo_backend() -> AsyncIterator[DemoBackend]:
    backend = DemoBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def scrape(running: Running, accept: str | None = None) -> tuple[str, str]:
    """(body, content type) of GET /metrics."""
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{running.admin_port}/metrics", headers=headers
    ) as response:
        assert response.status == 200
        return await response.text(), response.headers["Content-Type"]


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def series(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Series, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


async def attempt(url: str, messages: Iterable[str] = ()) -> tuple[int | None, str]:
    """One connection. Without `messages`, wait for the server's close; with them,
    send each (echoed) and close with 1000. (code, reason) of the close, or
    (HTTP status, "") for an upgrade answered without a 101."""
    messages = list(messages)
    try:
        async with connect(url, open_timeout=5, close_timeout=2, compression=None) as ws:
            for m in messages:
                await ws.send(m)
                assert await ws.recv() == m
            if not messages:
                await ws.recv()
    except ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, "")
    except InvalidStatus as e:
        return e.response.status_code, ""
    return ws.close_code, ws.close_reason or ""


# --- unit: labels -------------------------------------------------------------------


def test_code_label_mapping() -> None:
    exact = frozenset({1008, 4001, 3003})
    assert [code_label(c, exact) for c in (1000, 1005, 1006, 1008, 1015)] == ["1000", "1005", "1006", "1008", "1015"]
    assert code_label(4001, exact) == "4001" and code_label(3003, exact) == "3003"
    assert code_label(4002, exact) == "4xxx" and code_label(3000, exact) == "3xxx"
    assert code_label(1016, exact) == "other" and code_label(999, exact) == "other"
    assert code_label(2000, exact) == "other" and code_label(5000, exact) == "other"
    labels = code_labels([1008, 4001])
    assert labels[:16] == tuple(str(c) for c in range(1000, 1016))
    assert labels[16:] == ("4001", "3xxx", "4xxx", "other")


def test_client_hash_is_stable_and_short() -> None:
    assert client_hash("alice@10.0.0.1") == client_hash("alice@10.0.0.1")
    assert re.fullmatch(r"[0-9a-f]{16}", client_hash("alice@10.0.0.1"))
    assert client_hash("alice@10.0.0.1") != client_hash("alice@10.0.0.2")


# --- the scripted session ------------------------------------------------------------


def documented_families() -> dict[str, str]:
    families = promql.catalogue(CATALOGUE)
    assert len(families) >= 25, "the catalogue table of docs/metrics.md did not parse"
    return families


def exposed_families(text: str) -> dict[str, str]:
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name + ("_total" if family.type == "counter" else "")] = family.type
    return out


async def test_scripted_session_metric_by_metric() -> None:
    """A loop (3 auth failures, then refusals in cooldown), a healthy client with
    messages (one connection still open at the first scrape), a 403 at the
    upgrade, and the upstream breaker tripped by an unreachable route."""
    async with demo_backend() as backend, RawBackend(
        lambda head: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        close_after=True,
    ) as forbidding:
        routes = {
            "/ws": f"ws://127.0.0.1:{backend.port}",
            "/auth": forbidding.url,
            "/down": f"ws://127.0.0.1:{free_port()}",
        }
        settings = settings_with(
            routes,
            **QUIET_RULES,
            **{
                "policy.cooldown.base": "30s",
                "policy.cooldown.jitter": 0,
                "breakers.upstream.min_calls": 3,
                "detection.fleet.window": "60s",
                "detection.auth_close_codes": [1008, 4001],
            },
        )
        exporter = InMemorySpanExporter()
        async with telemetered(settings, exporter=exporter) as lw:
            base = f"ws://127.0.0.1:{lw.proxy_port}"

            # The loop: 3 closes 1008 at once, then refused (cooldown) twice.
            loop_url = f"{base}/ws?token={issue_token('tab-42', -60)}"
            seen = [await attempt(loop_url) for _ in range(3)]
            # The engine's cooldown (on native, written to the table in the same batch).
            await wait_for(lambda: getattr(lw.engine.client(client_key("tab-42"), time.monotonic()), "status", "") == "cooldown")
            seen += [await attempt(loop_url) for _ in range(2)]
            assert [c for c, _ in seen] == [1008, 1008, 1008, 1013, 1013]

            # A healthy client: one connection closed normally, one left open.
            good_url = f"{base}/ws?token={issue_token('alice', 60)}"
            sent = ["a", "bb", "ccc"]
            async with connect(good_url, compression=None) as ws:
                for m in sent:
                    await ws.send(m)
                    assert await ws.recv() == m
            open_ws = await connect(good_url, compression=None)
            await open_ws.send("dddd")
            assert await open_ws.recv() == "dddd"
            await open_ws.send("eeeee")
            assert await open_ws.recv() == "eeeee"
            # The first connection's close judged by the brain (its messages in the totals).
            await wait_for(lambda: lw.active_connections() == 1 and lw.plane.settled())

            # An upgrade answered 403: an auth failure at the handshake.
            assert await attempt(f"{base}/auth") == (403, "")

            # Every client connection, whatever its state: the open WebSocket
            # and one stalled in its request head.
            stalled_head = await asyncio.open_connection("127.0.0.1", lw.proxy_port)
            stalled_head[1].write(b"GET /ws HTTP/1.1\r\n")
            await wait_for(lambda: lw.plane.connections() == 2)
            first = series((await scrape(lw))[0])
            stalled_head[1].close()
            assert value(first, "loopwatch_client_connections") == 2
            assert value(first, "loopwatch_client_connections_max") == settings.limits.max_connections
            # Live connections are in the counters while they last …
            assert value(first, "loopwatch_connections_active", route="/ws") == 1
            assert value(first, "loopwatch_messages_total", route="/ws", direction="client_to_upstream") == 5
            assert value(first, "loopwatch_messages_total", route="/ws", direction="upstream_to_client") == 5
            assert value(first, "loopwatch_message_bytes_total", route="/ws", direction="client_to_upstream") == 15
            assert value(first, "loopwatch_message_bytes_total", route="/ws", direction="upstream_to_client") == 15
            await open_ws.close()
            await wait_for(lambda: idle(lw))
            # … and folded into them exactly once when they close.
            await wait_for(lambda: lw.plane.connections() == 0)
            second = series((await scrape(lw))[0])
            assert value(second, "loopwatch_connections_active", route="/ws") == 0
            assert value(second, "loopwatch_client_connections") == 0
            for name, n in (("loopwatch_messages_total", 5), ("loopwatch_message_bytes_total", 15)):
                for direction in ("client_to_upstream", "upstream_to_client"):
                    assert value(second, name, route="/ws", direction=direction) == n

            # The breaker: connect errors on /down until loopwatch refuses (circuit open).
            down = f"{base}/down"
            failures = 0
            while (result := await attempt(down)) == (502, ""):
                failures += 1
                assert failures < 20, "the upstream breaker never opened"
                await wait_for(lambda: idle(lw))  # the breaker's state in the native table too
            assert result[0] == 1013 and "upstream unavailable" in result[1]
            assert failures >= 3
            await wait_for(lambda: idle(lw))  # the refusal's events judged (native: drained)

            text, content_type = await scrape(lw)
            assert content_type.startswith("text/plain")
            om_text, om_type = await scrape(lw, OPENMETRICS)
            assert om_type.startswith("application/openmetrics-text")
            t_end = time.monotonic()
            snap = lw.engine.snapshot(t_end)
        spans = exporter.get_finished_spans()

    s = series(text)
    v = lambda name, **labels: value(s, name, **labels)  # noqa: E731

    # Attempts by outcome, refusals by reason, per route; all other series at 0.
    attempts = {
        ("/ws", "opened"): 5, ("/ws", "refused"): 2, ("/auth", "upstream_refused"): 1,
        ("/down", "upstream_error"): failures, ("/down", "refused"): 1,
    }  # fmt: skip
    for route in routes:
        for outcome in ("opened", "refused", "upstream_refused", "upstream_error", "client_gone"):
            expected = attempts.get((route, outcome), 0)
            assert v("loopwatch_connection_attempts_total", route=route, outcome=outcome) == expected
        for reason in ("cooldown", "min_interval", "max_concurrent", "deny", "circuit_open"):
            expected = {("/ws", "cooldown"): 2, ("/down", "circuit_open"): 1}.get((route, reason), 0)
            assert v("loopwatch_refusals_total", route=route, reason=reason) == expected
        for error in ("connect", "timeout", "closed", "bad_response", "status_5xx"):
            expected = failures if (route, error) == ("/down", "connect") else 0
            assert v("loopwatch_upstream_handshake_errors_total", route=route, error=error) == expected
        expected = {"/ws": 3, "/auth": 1}.get(route, 0)
        assert v("loopwatch_auth_failures_total", route=route) == expected
        assert v("loopwatch_connections_active", route=route) == 0
    for reason in ("cooldown", "min_interval", "max_concurrent", "deny", "circuit_open"):
        assert v("loopwatch_would_reject_total", reason=reason) == 0

    # Closes: exact codes 1000–1015 and the auth codes, classes otherwise.
    closes = {k: n for k, n in s.items() if k[0] == "loopwatch_connection_closes_total"}
    assert len(closes) == 3 * 3 * len(code_labels([1008, 4001]))  # routes × initiators × codes
    assert {dict(k[1])["code"] for k in closes} == set(code_labels([1008, 4001]))
    nonzero = {(dict(k[1])["route"], dict(k[1])["code"], dict(k[1])["initiator"]): n for k, n in closes.items() if n}
    assert nonzero == {("/ws", "1008", "upstream"): 3, ("/ws", "1000", "client"): 2}

    # Histograms: one observation per relayed connection / upstream answer.
    assert v("loopwatch_connection_duration_seconds_count", route="/ws") == 5
    assert v("loopwatch_connection_duration_seconds_count", route="/down") == 0
    assert 0 < v("loopwatch_connection_duration_seconds_sum", route="/ws") < 30
    assert v("loopwatch_upstream_handshake_duration_seconds_count", route="/ws") == 5
    assert v("loopwatch_upstream_handshake_duration_seconds_count", route="/auth") == 1
    assert v("loopwatch_upstream_handshake_duration_seconds_count", route="/down") == 0
    assert v("loopwatch_connection_duration_seconds_bucket", route="/ws", le="+Inf") == 5

    # Messages and bytes: the totals of closed connections, nothing lost or doubled.
    assert v("loopwatch_messages_total", route="/ws", direction="client_to_upstream") == 5
    assert v("loopwatch_message_bytes_total", route="/ws", direction="upstream_to_client") == 15
    assert v("loopwatch_messages_total", route="/auth", direction="client_to_upstream") == 0

    # Findings, cooldowns and the flagged/cooldown gauges.
    for rule in RULE_NAMES:
        for severity in ("warning", "critical"):
            expected = 1 if (rule, severity) == ("auth_failure_loop", "critical") else 0
            assert v("loopwatch_findings_total", rule=rule, severity=severity) == expected
            # Standing: the loop alert reads it (a finding is raised once, then refreshed).
            assert v("loopwatch_clients_flagged", rule=rule, severity=severity) == expected
    for rule in (*RULE_NAMES, "manual"):
        assert v("loopwatch_cooldowns_total", rule=rule) == (1 if rule == "auth_failure_loop" else 0)
    assert v("loopwatch_clients_in_cooldown") == 1
    # tab-42@…, alice@… and the token-less 127.0.0.1 (the /auth and /down attempts).
    assert v("loopwatch_clients_tracked") == 3
    assert v("loopwatch_clients_evicted_total") == 0
    total_attempts = sum(attempts.values())
    assert v("loopwatch_fleet_attempts_per_second") == pytest.approx(total_attempts / 60)
    # Auth outcomes: 3 closes 1008 + the 403 failed; alice's 2 normal closes succeeded.
    assert v("loopwatch_fleet_auth_failure_ratio") == pytest.approx(4 / 6)
    assert v("loopwatch_reconnect_storm") == 0

    # The breakers, every route's: /down's upstream open (one transition), the rest closed.
    for route in routes:
        for breaker in ("upstream", "auth"):
            current = "open" if (route, breaker) == ("/down", "upstream") else "closed"
            for state in ("closed", "open", "half_open"):
                assert v("loopwatch_circuit_state", route=route, breaker=breaker, state=state) == (
                    1 if state == current else 0
                )
                expected = 1 if (route, breaker, state) == ("/down", "upstream", "open") else 0
                assert v("loopwatch_circuit_transitions_total", route=route, breaker=breaker, to=state) == expected

    # Top offenders: hashed keys, the engine's top-K.
    top = {dict(k[1])["client"]: n for k, n in s.items() if k[0] == "loopwatch_top_offender_attempts_per_second"}
    assert set(top) == {client_hash(key) for key, _ in snap.top_offenders}
    assert {client_hash("tab-42@127.0.0.1"), client_hash("127.0.0.1")} <= set(top)  # the two loopers
    assert len(top) <= 10 and all(n > 0 for n in top.values())

    for observer in ("tracing", "metrics", "eventlog"):
        assert v("loopwatch_observer_errors_total", observer=observer) == 0
    assert v("loopwatch_state_store_up") == 1  # state.backend: memory
    assert v("loopwatch_state_store_errors_total") == 0
    assert v("loopwatch_state_store_messages_dropped_total") == 0
    assert v("loopwatch_spans_dropped_total") == 0  # every span reached the exporter
    assert v("loopwatch_config_reloads_total", result="ok") == 0
    assert v("loopwatch_config_reloads_total", result="error") == 0
    assert v("loopwatch_config_last_reload_successful") == 1
    assert v("loopwatch_build_info", version="0.1.0", dataplane="native", frame_parser="rust") == 1

    # The families exposed are exactly the catalogue's, with the same types.
    documented = documented_families()
    exposed = exposed_families(text)
    assert set(exposed) == set(documented)
    assert exposed == documented

    # OpenMetrics: the same families (strict parser), exemplars with trace ids.
    om = {f.name: f for f in om_parser.text_string_to_metric_families(om_text)}
    assert {n + ("_total" if f.type == "counter" else "") for n, f in om.items()} - {"loopwatch_build"} == set(
        documented
    ) - {"loopwatch_build_info"}
    assert om["loopwatch_build"].type == "info"
    third = [sp for sp in spans if sp.attributes.get("loopwatch.connection.id") == 3]
    assert len(third) == 1
    third_trace = f"{third[0].context.trace_id:032x}"
    finding = [
        x for x in om["loopwatch_findings"].samples
        if x.labels == {"rule": "auth_failure_loop", "severity": "critical"}
    ]  # fmt: skip
    assert finding[0].exemplar is not None and finding[0].exemplar.labels == {"trace_id": third_trace}
    exemplars = {
        x.exemplar.labels["trace_id"]
        for x in om["loopwatch_connection_duration_seconds"].samples
        if x.exemplar is not None
    }
    relayed = {f"{sp.context.trace_id:032x}" for sp in spans if "loopwatch.connection.id" in sp.attributes}
    assert exemplars and exemplars <= relayed


# --- promtool on the real scrape ------------------------------------------------------


async def _loop_scrapes() -> tuple[str, str]:
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}")
        async with telemetered(settings, exporter=InMemorySpanExporter()) as lw:
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('tab-1', -60)}"
            for _ in range(5):
                await attempt(url)
            await attempt(f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('ok', 60)}", ["hi"])
            return (await scrape(lw))[0], (await scrape(lw, OPENMETRICS))[0]


async def test_promtool_accepts_the_scrape_in_both_formats(tmp_path: Path) -> None:
    """`promtool check metrics` lints the text format. It cannot read OpenMetrics
    (promtool 2.42, Debian's, parses text 0.0.4 only and stops at the first
    exemplar), so the OpenMetrics scrape goes through Prometheus's own
    OpenMetrics parser instead: `promtool tsdb create-blocks-from openmetrics`,
    after stamping each sample with the scrape time, which backfill requires."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: make test installs the Debian package prometheus"
    text, om = await _loop_scrapes()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    assert om.endswith("# EOF\n") and " # {trace_id=" in om
    stamp = int(time.time())
    stamped = []
    for line in om.splitlines():
        if line.startswith("#"):
            stamped.append(line)
            continue
        sample, sep, exemplar = line.partition(" # ")
        stamped.append(f"{sample} {stamp}" + (sep + exemplar if sep else ""))
    source = tmp_path / "scrape.om"
    source.write_text("\n".join(stamped) + "\n")
    blocks = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", "openmetrics", str(source), str(tmp_path / "tsdb")],
        capture_output=True, text=True, timeout=120,
    )
    assert blocks.returncode == 0, blocks.stdout + blocks.stderr
    samples = sum(1 for line in om.splitlines() if line and not line.startswith("#"))
    assert re.search(rf"\b{samples}\b", blocks.stdout), blocks.stdout  # NUM SAMPLES: every line read


# --- cardinality ----------------------------------------------------------------------


def _client(i: int) -> tuple[str, str]:
    """(peer, key): odd clients are keyed by a JWT subject (bound to the address,
    as the data plane keys them), even ones by address."""
    peer = f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}"
    return peer, (client_key(f"user-{i}", peer) if i % 2 else peer)


def _attempt(gate: EngineGate, key: str, peer: str, t: float) -> tuple[Connection, Refusal | None]:
    """An attempt as the data plane reports it (identified, at `t`), judged."""
    conn = Connection(key=key, route="/", peer=peer, t0=t)
    return conn, gate.judge(conn, ev.Attempt(key, "/", t, peer))


async def _drive(settings: Settings, n: int, loopers: int) -> tuple[str, set[str], Telemetry]:
    """n distinct clients through the brain (no sockets): each connects once and
    lives a second; `loopers` of them, spread among the others (so the auth
    breaker sees a fleet that mostly succeeds), loop: 403s until refused."""
    telemetry = Telemetry(settings, build_registry(), spans=make_tracing([InMemorySpanExporter()]))
    gate = build_gate(settings, Observers(telemetry.observers))
    telemetry.bind(None, gate.engine, gate.observers)
    from loopwatch.proxy.dataplane.boundary import RelayStats

    keys: set[str] = set()
    t = time.monotonic()
    stats = RelayStats(2, 2, 10, 10)
    every = n // loopers
    for i in range(n):
        peer, key = _client(i)
        t += 0.0001
        if i % every == 0:
            for _ in range(6):
                conn, refusal = _attempt(gate, key, peer, t)
                keys.add(conn.key)
                if refusal is None:
                    gate.handshake_failed(conn, t + 0.001, 403, None)
                t += 0.01
            continue
        conn, refusal = _attempt(gate, key, peer, t)
        keys.add(conn.key)
        assert refusal is None
        conn.conn_id = i + 1
        gate.opened(conn, t + 0.001)
        gate.closed(conn, t + 1.0, 1000 if i % 3 else 4999, "", "client", stats)
    gate.close()
    telemetry.shutdown()  # hands the waiting spans over, then stops the exporter
    telemetry.spans.shutdown()  # type: ignore[union-attr]  # not owned by the bundle
    return generate_latest(telemetry.registry).decode(), keys, telemetry


def _label_values(text: str, skip: str) -> tuple[set[str], int, list[str]]:
    values: set[str] = set()
    count = 0
    top: list[str] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            count += 1
            if s.name == skip:
                top.append(s.labels["client"])
                continue
            values.update(s.labels.values())
    return values, count, top


TOP = "loopwatch_top_offender_attempts_per_second"


async def test_ten_thousand_clients_add_no_series() -> None:
    settings = settings_with(upstream="ws://127.0.0.1:9")
    small, small_keys, _ = await _drive(settings, 20, loopers=5)
    text, keys, telemetry = await _drive(settings, 10_000, loopers=200)
    assert len(keys) == 10_000 and len(small_keys) == 20

    values, count, top = _label_values(text, TOP)
    small_values, small_count, small_top = _label_values(small, TOP)
    # The same series at 20 clients and at 10 000, apart from the bounded top-K.
    assert count - len(top) == small_count - len(small_top)
    assert values == small_values
    for label in values:
        assert label not in keys
        assert not any(key in label for key in keys if len(key) <= len(label))
    # Top-K: at most detection.top_k series, pseudonyms only.
    assert 0 < len(top) <= settings.detection.top_k == 10
    assert not set(top) & keys
    assert set(top) <= {client_hash(k) for k in keys}
    # The loopers were flagged and counted; everyone else is healthy.
    s = series(text)
    assert value(s, "loopwatch_findings_total", rule="auth_failure_loop", severity="critical") == 200
    assert value(s, "loopwatch_clients_tracked") == 10_000
    abnormal = sum(1 for i in range(10_000) if i % 3 == 0 and i % 50)  # closed 4999
    assert value(s, "loopwatch_connection_closes_total", route="/", code="4xxx", initiator="client") == abnormal
    assert value(s, "loopwatch_connection_closes_total", route="/", code="1000", initiator="client") == 9_800 - abnormal
    assert telemetry.collector is not None


async def test_top_k_bound_and_exposed_keys() -> None:
    settings = settings_with(
        upstream="ws://127.0.0.1:9", **{"detection.top_k": 3, "telemetry.expose_client_keys": True}
    )
    text, keys, _ = await _drive(settings, 500, loopers=20)
    _, _, top = _label_values(text, TOP)
    assert len(top) == 3 and set(top) <= keys


async def test_real_proxy_sample_of_distinct_clients() -> None:
    """A smaller sample through the real proxy: 120 distinct clients (JWT subjects),
    a few of them looping; no label beyond the top-K holds a key."""
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}", **{"detection.top_k": 5})
        async with telemetered(settings) as lw:
            base = f"ws://127.0.0.1:{lw.proxy_port}/ws?token="
            subjects = [f"user-{i}" for i in range(120)]

            async def one(sub: str) -> None:
                ttl = -60 if sub.endswith(("7", "3")) else 60
                for _ in range(4 if ttl < 0 else 1):
                    await attempt(base + issue_token(sub, ttl), ["x"] if ttl > 0 else [])

            for i in range(0, len(subjects), 20):
                await asyncio.gather(*(one(s) for s in subjects[i : i + 20]))
            await wait_for(lambda: idle(lw))
            text, _ = await scrape(lw)
    keys = {f"{s}@127.0.0.1" for s in subjects}
    values, _, top = _label_values(text, TOP)
    assert not values & keys and not any(s in v for v in values for s in subjects)
    assert 0 < len(top) <= 5 and not set(top) & keys and set(top) <= {client_hash(k) for k in keys}
    s = series(text)
    assert value(s, "loopwatch_connection_attempts_total", route="/", outcome="opened") >= 120
    assert value(s, "loopwatch_messages_total", route="/", direction="client_to_upstream") == 96


# --- reloads and observer errors ----------------------------------------------------------


async def test_config_reloads_are_counted(tmp_path: Path) -> None:
    async def last_load(lw: Running) -> tuple[float, float]:
        s = series((await scrape(lw))[0])
        return (
            value(s, "loopwatch_config_last_reload_successful"),
            value(s, "loopwatch_config_last_reload_success_timestamp_seconds"),
        )

    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        config.write_text(f'upstream: "ws://127.0.0.1:{backend.port}"\n')
        overrides = {"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
        settings = load_settings(config, env={}, overrides=overrides)
        before_start = time.time()
        async with telemetered(settings, sources=ConfigSources(str(config), {}, overrides)) as lw:
            ok, started = await last_load(lw)  # the start's load is the last good one
            assert ok == 1 and before_start <= started <= time.time()
            lw.reload()
            ok, reloaded = await last_load(lw)
            assert ok == 1 and reloaded >= started
            config.write_text("detection: {quiet_period: forever}\n")
            with pytest.raises(Exception, match="quiet_period"):
                lw.reload()
            # Refused: 0 until a reload succeeds, and the last good one's time stays.
            assert await last_load(lw) == (0, reloaded)
            config.write_text(f'upstream: "ws://127.0.0.1:{backend.port}"\ndetection: {{auth_close_codes: [1008, 4403]}}\n')
            lw.reload()
            ok, fixed = await last_load(lw)
            assert ok == 1 and fixed >= reloaded
            s = series((await scrape(lw))[0])
    assert value(s, "loopwatch_config_reloads_total", result="ok") == 2
    assert value(s, "loopwatch_config_reloads_total", result="error") == 1
    # A reloaded auth code gets its own exact code series.
    assert value(s, "loopwatch_connection_closes_total", route="/", code="4403", initiator="upstream") == 0


async def test_close_oldest_is_no_auth_failure() -> None:
    """Its 1008 is loopwatch's own: counted as an auth failure, it fed
    LoopwatchAuthFailureRatioHigh. (That a failing handshake closes nothing is
    the engine's: tests/detectors/test_engine_policy.py.)"""
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}", **{
            "policy.max_concurrent": 1, "policy.on_max_concurrent": "close-oldest"})  # fmt: skip
        async with telemetered(settings) as lw:
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token=" + issue_token("tab", 300)
            async with connect(url, compression=None) as first, connect(url, compression=None) as second:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(first.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
                await second.send("new")
                assert await second.recv() == "new"
            await wait_for(lambda: lw.plane.settled())
            s = series((await scrape(lw))[0])
    assert value(s, "loopwatch_connection_closes_total", route="/", code="1008", initiator="proxy") == 1
    assert value(s, "loopwatch_auth_failures_total", route="/") == 0


async def test_a_route_a_reload_adds_is_counted(tmp_path: Path) -> None:
    """Its series made at the reload, at 0: its attempts failed inside the
    metrics observer (KeyError), so it stayed invisible to the dashboard and
    the alerts until a restart."""
    async with demo_backend() as backend:
        config = tmp_path / "loopwatch.yaml"
        upstream = f"ws://127.0.0.1:{backend.port}"
        config.write_text(f'upstream: "{upstream}"\n')
        overrides = {"listen": "127.0.0.1:0", "admin.listen": "127.0.0.1:0"}
        settings = load_settings(config, env={}, overrides=overrides)
        async with telemetered(settings, sources=ConfigSources(str(config), {}, overrides)) as lw:
            config.write_text(f'routes:\n  - {{path_prefix: "/new", upstream: "{upstream}/ws"}}\n'
                              f'  - {{path_prefix: "/", upstream: "{upstream}"}}\n')  # fmt: skip
            lw.reload()
            s = series((await scrape(lw))[0])
            assert value(s, "loopwatch_connection_attempts_total", route="/new", outcome="opened") == 0
            token = issue_token("fresh", 300)
            assert await attempt(f"ws://127.0.0.1:{lw.proxy_port}/new?token={token}", ["hi"]) == (1000, "")
            expired = issue_token("stale", -60)
            assert (await attempt(f"ws://127.0.0.1:{lw.proxy_port}/new?token={expired}"))[0] == 1008
            await wait_for(lambda: lw.plane.settled())
            s = series((await scrape(lw))[0])
    assert value(s, "loopwatch_connection_attempts_total", route="/new", outcome="opened") == 2
    assert value(s, "loopwatch_auth_failures_total", route="/new") == 1
    assert value(s, "loopwatch_upstream_handshake_duration_seconds_count", route="/new") == 2
    assert value(s, "loopwatch_observer_errors_total", observer="metrics") == 0


class Boom(Observer):
    name = "boom"

    def __init__(self) -> None:
        self.calls = 0

    def _raise(self, *args: object) -> None:
        self.calls += 1
        raise RuntimeError("observer bug")

    on_attempt = on_opened = on_closed = on_outcome = _raise  # type: ignore[assignment]


async def test_a_raising_observer_is_counted_and_relaying_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    boom = Boom()
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}")
        with caplog.at_level("ERROR", logger="loopwatch.observers"):
            async with telemetered(settings, extra=[boom]) as lw:
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('alice', 60)}"
                for _ in range(3):
                    assert await attempt(url, ["ping", "pong"]) == (1000, "")
                await wait_for(lambda: idle(lw))
                s = series((await scrape(lw))[0])
    assert boom.calls >= 9  # attempt, opened, closed × 3 (and any outcomes)
    assert value(s, "loopwatch_observer_errors_total", observer="boom") == boom.calls
    assert value(s, "loopwatch_observer_errors_total", observer="metrics") == 0
    assert value(s, "loopwatch_messages_total", route="/", direction="client_to_upstream") == 6
    assert value(s, "loopwatch_connection_closes_total", route="/", code="1000", initiator="client") == 3
    errors = [r for r in caplog.records if r.name == "loopwatch.observers"]
    assert len(errors) == 1 and errors[0].fields == {"observer": "boom", "hook": "on_attempt"}  # type: ignore[attr-defined]


async def test_an_event_whose_handling_raises_is_counted_and_the_next_are_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The new-changes probe: an event the brain failed to handle was logged
    (a traceback per kind every 10 s) and counted nowhere an alert could see."""
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}")
        with caplog.at_level("ERROR", logger="loopwatch"):
            async with telemetered(settings) as lw:
                record = lw.engine.record
                failed = {"left": 2}

                def flaky(event: Any) -> Any:
                    if type(event).__name__ == "Opened" and failed["left"]:
                        failed["left"] -= 1
                        raise OverflowError("a bug")
                    return record(event)

                lw.engine.record = flaky  # type: ignore[method-assign]
                url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('alice', 60)}"
                for _ in range(3):
                    assert await attempt(url, ["ping"]) == (1000, "")
                await wait_for(lambda: idle(lw))
                # A batch's bookkeeping that raises (here the table's flush) counts too.
                table = lw.gate.table  # type: ignore[attr-defined]  # EngineGate with the native plane
                flush = table.flush

                def broken_flush(now: float) -> None:
                    table.flush = flush
                    raise RuntimeError("a bug")

                table.flush = broken_flush
                assert await attempt(url, ["ping"]) == (1000, "")
                await wait_for(lambda: idle(lw) and table.flush is flush)
                s = series((await scrape(lw))[0])
    assert value(s, "loopwatch_events_failed_total") == 3
    assert value(s, "loopwatch_connection_closes_total", route="/", code="1000", initiator="client") == 4
    assert [r.getMessage() for r in caplog.records if "event failed" in r.getMessage()] == [
        "handling a Opened event failed (0 more since the last such line)"
    ]


async def test_detection_off_counts_never_go_backwards() -> None:
    """With `Gate()` (detection off) no observer sees a close, so live message
    counts are not added: a counter must never drop when a connection ends."""
    from loopwatch.proxy.dataplane.boundary import Gate

    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}")
        telemetry = Telemetry(settings, build_registry())
        lw = await start(settings, Gate(), telemetry=telemetry)
        try:
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('alice', 60)}"
            async with connect(url, compression=None) as ws:
                await ws.send("hello")
                assert await ws.recv() == "hello"
                live = series((await scrape(lw))[0])
            await wait_for(lambda: idle(lw))
            after = series((await scrape(lw))[0])
        finally:
            await lw.close()
    assert value(live, "loopwatch_connections_active", route="/") == 1
    assert value(after, "loopwatch_connections_active", route="/") == 0
    for s in (live, after):
        assert value(s, "loopwatch_messages_total", route="/", direction="client_to_upstream") == 0


async def test_observe_mode_counts_would_reject_not_cooldowns() -> None:
    async with demo_backend() as backend:
        # retry_within widened: on a loaded machine a retry can start over 1 s after the
        # previous close and restart the streak (the rule's timing is tested elsewhere).
        slack = {"detection.rules.auth_failure_loop.retry_within": "30s"}
        settings = settings_with(
            upstream=f"ws://127.0.0.1:{backend.port}", **{"policy.mode": "observe", **QUIET_RULES, **slack}
        )
        async with telemetered(settings) as lw:
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('tab-7', -60)}"
            seen = [await attempt(url) for _ in range(5)]
            await wait_for(lambda: idle(lw))  # every event judged by the brain
            s = series((await scrape(lw))[0])
    assert seen == [(1008, "token expired")] * 5  # never refused
    assert value(s, "loopwatch_findings_total", rule="auth_failure_loop", severity="critical") == 1
    assert value(s, "loopwatch_would_reject_total", reason="cooldown") == 2  # the 4th and 5th attempts
    assert value(s, "loopwatch_cooldowns_total", rule="auth_failure_loop") == 0
    assert value(s, "loopwatch_clients_in_cooldown") == 0
    assert value(s, "loopwatch_refusals_total", route="/", reason="cooldown") == 0
    assert value(s, "loopwatch_connection_attempts_total", route="/", outcome="opened") == 5


async def test_a_manual_cooldown_is_counted_as_manual() -> None:
    async with demo_backend() as backend:
        settings = settings_with(upstream=f"ws://127.0.0.1:{backend.port}")
        async with telemetered(settings) as lw:
            lw.engine.force_cooldown(client_key("mallory"), 30.0, time.monotonic())
            lw.gate.kick()  # type: ignore[attr-defined]  # what the admin API does after an operator's call
            await wait_for(lambda: value(series(generate_latest(lw.telemetry.registry).decode()),  # type: ignore[union-attr]
                                         "loopwatch_cooldowns_total", rule="manual") == 1)
            url = f"ws://127.0.0.1:{lw.proxy_port}/ws?token={issue_token('mallory', 60)}"
            assert (await attempt(url))[0] == 1013
            s = series((await scrape(lw))[0])
    assert value(s, "loopwatch_clients_in_cooldown") == 1
    assert value(s, "loopwatch_refusals_total", route="/", reason="cooldown") == 1
    assert sum(value(s, "loopwatch_cooldowns_total", rule=r) for r in RULE_NAMES) == 0


def test_plain_number_stores_export_like_prometheus_client() -> None:
    """promstore's histogram against prometheus_client's own, on the same observations."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Histogram

    from loopwatch.proxy.observe.promstore import CounterStore, HistogramStore

    bounds = (0.1, 1.0, 5.0)
    mine = HistogramStore("h_seconds", "h", bounds)
    mine.create(["/"])
    registry = CollectorRegistry()
    ref = Histogram("h_seconds", "h", ["route"], buckets=bounds, registry=registry)
    for x in (0.05, 0.1, 0.1000001, 1.0, 4.9, 5.0, 7.0, 0.0):
        mine.observe("/", x)
        ref.labels("/").observe(x)
    mine.observe("/", 0.5, SimpleNamespace(trace_id_hex="ab" * 16))
    ref.labels("/").observe(0.5)
    ours = {(s.name, s.labels.get("le")): s.value for s in mine.family().samples}
    theirs = {
        (s.name, s.labels.get("le")): s.value
        for s in next(iter(registry.collect())).samples
        if not s.name.endswith("_created")  # a timestamp loopwatch does not expose
    }
    assert ours == theirs
    assert ours["h_seconds_bucket", "0.1"] == 3 and ours["h_seconds_bucket", "+Inf"] == 9
    exemplars = [s.exemplar for s in mine.family().samples if s.exemplar is not None]
    assert [(e.labels, e.value) for e in exemplars] == [({"trace_id": "ab" * 16}, 0.5)]

    counter = CounterStore("c", "c", "rule")
    counter.create("a")
    counter.add(("b",), 2, SimpleNamespace(trace_id_hex="cd" * 16))
    samples = {s.labels["rule"]: (s.name, s.value, s.exemplar) for s in counter.family().samples}
    assert samples["a"] == ("c_total", 0, None)
    assert samples["b"][:2] == ("c_total", 2) and samples["b"][2].labels == {"trace_id": "cd" * 16}
