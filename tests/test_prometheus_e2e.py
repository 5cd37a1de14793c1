"""Live end to end: a real Prometheus scrapes a real loopwatch while clients loop.

Debian's `prometheus` (2.42) runs on a free loopback port with a temporary
TSDB, 1 s scrape and evaluation intervals and the project's rule files,
rewritten into a temp dir with every alert's `for:` cut to a few seconds.
loopwatch runs in this process in front of the demo backend (which closes
1008 on an expired token and echoes otherwise) and of a dead upstream, and a
scripted session produces what every panel of the dashboard is there to show:

* a healthy client holding one connection and exchanging messages;
* the incident's client: an expired token, a reconnect every 50 ms — flagged,
  then refused in cooldown;
* the same loop from a client on `policy.allow`, so enforcement only records
  what it would have refused (`loopwatch_would_reject_total`) and its auth
  failures keep reaching the backend;
* a reload of the configuration (POST /api/reload), with an observer that
  raises on it (`loopwatch_observer_errors_total{observer="failing"}`);
* a reconnect storm: many distinct clients connecting once each, more than
  `detection.max_clients`, so the least recently seen are evicted;
* an upstream outage: distinct clients on a route whose upstream refuses TCP,
  until the upstream circuit breaker opens;
* traces exported from the span exporter process, which is stopped (SIGSTOP)
  from the reload to the end of the outage, so spans are lost and counted
  (`loopwatch_spans_dropped_total`) while the proxy goes on serving;
* requests refused before detection: request heads with two Content-Length
  headers (a smuggling shape), answered 400 and counted in
  `loopwatch_requests_rejected_total{reason="bad_request"}`;
* a stalled brain: its event loop blocked (as by a long pause) while clients
  keep coming; the data plane answers every one of them, and the queue to the
  brain (QUEUE_CAPACITY events here instead of 65 536) drops what it cannot
  hold (`loopwatch_events_dropped_total`);
* the shared state store lost: loopwatch runs with `state.backend: redis` on a
  redis-server the test starts, stops for a while (the replica decides alone,
  `loopwatch_state_store_up` 0, LoopwatchStateStoreDown fires) and starts
  again (it reconnects by itself), then refuses a few foreign batches on its
  channel (`loopwatch_state_store_messages_refused_total`).

loopwatch's own health (`process_*`, `loopwatch_event_loop_lag_seconds`) needs
no scripting: it is there from the first scrape.

Through Prometheus' HTTP API the test sees LoopwatchConnectionLoopDetected go
pending, then firing; sees every PromQL expression of the dashboard (template
variables substituted both as "All" and as an explicit selection) return
series while the loop runs, each with a non-zero value at some point; checks
that every rule evaluates without error; then stops the clients and sees the
alert resolve. Prometheus is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from loopwatch.dashboards import generate, promql
from loopwatch.proxy.admin.server import build_registry
from loopwatch.proxy.app.runtime import ConfigSources, Running, start
from loopwatch.proxy.app.settings import load_settings
from loopwatch.proxy.dataplane import native
from loopwatch.proxy.observe import span_export
from loopwatch.proxy.observe.metrics import Telemetry
from loopwatch.proxy.observe.observers import Observer
from loopwatch.proxy.observe.span_export import ProcessSpanSink
from loopwatch.proxy.tools.demo_backend import issue_token
from tests.benchmarks.bench_telemetry import dropping_spans
from tests.clients import attempt, demo_backend
from tests.conftest import free_port, raw_exchange, upgrade_request
from tests.redisserver import RedisServer
from tests.wsraw import blocking_exchange

pytestmark = pytest.mark.slow

ALERT = "LoopwatchConnectionLoopDetected"
STORE_ALERT = "LoopwatchStateStoreDown"
JOB = "loopwatch"
SHORT_FOR = "3s"
SCRAPE = "1s"
# Grafana's $__rate_interval: max($__interval + scrape interval, 4 × scrape interval),
# with the data source's scrape interval set to the 1 s Prometheus uses here.
RATE_INTERVAL = "4s"
INTERVAL = "1s"
ALLOWED = "tolerated"  # the client on policy.allow: observed, never refused
STORM_CLIENTS = 150
MAX_CLIENTS = 50
BAD_REQUESTS = 5
# Two Content-Length headers: a request smuggling shape, refused with 400 before detection.
SMUGGLING = (
    b"POST /ws HTTP/1.1\r\nHost: lw.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
)
# The brain's queue in this test, and the attempts made while the brain is stalled:
# two events each (the Attempt, then its Rejected or HandshakeFailed), past the queue.
QUEUE_CAPACITY = 1024
UNSEEN_ATTEMPTS = 800


class SmallQueue(native.EventQueue):
    """The queue from the data plane to the brain, QUEUE_CAPACITY events deep: one
    stalled second loses events (the session's ordinary bursts stay far below it)."""

    def __init__(self, capacity: int = QUEUE_CAPACITY) -> None:
        super().__init__(capacity)


# --- Prometheus -----------------------------------------------------------------


def short_rules(directory: Path) -> list[Path]:
    """The project's rule files with every alert's `for:` cut to SHORT_FOR."""
    written = []
    for path in generate.rule_files():
        doc = yaml.safe_load(path.read_text())
        for rule in promql.rules(doc["groups"]):
            if "alert" in rule:
                rule["for"] = SHORT_FOR
        target = directory / path.name
        target.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(target)
    return written


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[tuple[str, Path]]:
    """Debian's prometheus on a free loopback port; yields (base URL, its log file)."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus not found: run `make system-deps` (Debian package prometheus)"
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    config = {
        "global": {
            "scrape_interval": SCRAPE,
            "scrape_timeout": SCRAPE,
            "evaluation_interval": SCRAPE,
        },
        "rule_files": [str(p) for p in short_rules(rules_dir)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        pid = process.pid
        if process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                process.wait(timeout=5)


class PrometheusAPI:
    def __init__(self, session: aiohttp.ClientSession, base: str, log: Path):
        self.session, self.base, self.log = session, base, log

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.base + path, params=params) as response:
            body = await response.json()
        assert body.get("status") == "success", f"GET {path} {params}: {body}"
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    async def alerts(self, name: str) -> list[dict[str, Any]]:
        return [
            a
            for a in (await self.get("/api/v1/alerts"))["alerts"]
            if a["labels"]["alertname"] == name
        ]

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with self.session.get(self.base + "/-/ready") as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(prometheus log empty)"


@contextlib.asynccontextmanager
async def api(base: str, log: Path) -> AsyncIterator[PrometheusAPI]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        client = PrometheusAPI(session, base, log)
        await client.wait_ready()
        yield client


async def poll(
    predicate: Callable[[], Awaitable[bool]], timeout: float, what: Callable[[], str]
) -> None:
    """Await `predicate` every 0.2 s until it holds; fail with `what()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g}s: {what()}")
        await asyncio.sleep(0.2)


# --- the dashboard's queries --------------------------------------------------------


def regex_escape(value: str) -> str:
    """How Grafana escapes a multi-value variable's value for a Prometheus regex."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def variable_sets(
    dashboard: dict[str, Any], instance: str, routes: list[str]
) -> dict[str, dict[str, str]]:
    """The values Grafana substitutes: every variable on "All", and an explicit
    selection of this job, this instance and every route."""
    now, start_of_range = dashboard["time"]["to"], dashboard["time"]["from"]
    assert now == "now" and start_of_range.startswith("now-"), dashboard["time"]
    common = {
        "datasource": "prometheus",
        "__rate_interval": RATE_INTERVAL,
        "__interval": INTERVAL,
        "__range": start_of_range.removeprefix("now-"),
    }
    every = {
        v["name"]: v["allValue"] for v in dashboard["templating"]["list"] if v.get("includeAll")
    }
    assert set(every) == {"job", "instance", "route"}, every
    chosen = {
        "job": regex_escape(JOB),
        "instance": regex_escape(instance),
        "route": "(" + "|".join(regex_escape(r) for r in routes) + ")",
    }
    return {"all": {**common, **every}, "selected": {**common, **chosen}}


@dataclass
class Query:
    panel: str
    template: str
    exprs: dict[str, str]  # variable set -> substituted expression
    nonzero: str | None = None  # a series seen with a finite non-zero value, as proof
    nonzero_at: float = 0.0  # time.monotonic() of that round
    empty: set[str] = field(default_factory=set)  # variable sets that returned nothing last round


def dashboard_queries(dashboard: dict[str, Any], sets: dict[str, dict[str, str]]) -> list[Query]:
    queries = []
    for panel, target in promql.dashboard_targets(dashboard):
        expr = target["expr"]
        queries.append(
            Query(
                panel["title"],
                expr,
                {name: promql.substitute(expr, values) for name, values in sets.items()},
            )
        )
    assert len(queries) >= 20, f"only {len(queries)} dashboard queries found"
    return queries


async def query_round(prom: PrometheusAPI, queries: list[Query]) -> None:
    """Run every query once (each variable set), noting empties and non-zero values."""
    jobs = [(q, name, expr) for q in queries for name, expr in q.exprs.items()]
    results = await asyncio.gather(*(prom.query(expr) for _, _, expr in jobs))
    for q in queries:
        q.empty.clear()
    for (q, name, _), series in zip(jobs, results, strict=True):
        if not series:
            q.empty.add(name)
        for s in series:
            value = float(s["value"][1])
            if q.nonzero is None and math.isfinite(value) and value != 0:
                q.nonzero, q.nonzero_at = f"{s['metric']} = {value:g}", time.monotonic()


async def variable_values(
    prom: PrometheusAPI, dashboard: dict[str, Any], values: dict[str, str]
) -> dict[str, set[str]]:
    """What each `label_values(selector, label)` query variable offers, as Grafana asks."""
    offered = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        text = (
            variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
        )
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
        assert match, f"variable {variable['name']}: unexpected query {text!r}"
        selector = promql.substitute(match.group(1), values)
        data = await prom.get(f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
        offered[variable["name"]] = set(data)
    return offered


def describe(queries: list[Query], which: Callable[[Query], bool]) -> str:
    """One line per query: its panel, the variable sets that came back empty, the query."""
    return "\n".join(
        f"  [{q.panel}] {'(empty: ' + ', '.join(sorted(q.empty)) + ') ' if q.empty else ''}"
        f"{q.exprs['all']}"
        for q in queries
        if which(q)
    )


# --- loopwatch and its clients -------------------------------------------------------------


class FailingObserver(Observer):
    """An observer with a bug: it raises on every configuration load. loopwatch
    logs it once, counts it and carries on."""

    name = "failing"

    def on_config(self, settings: Any, info: dict[str, object]) -> None:
        raise RuntimeError("observer bug (on purpose)")


def fail_one_opened(running: Running) -> None:
    """A bug in the brain: the healthy client's first Opened event raises.
    loopwatch handles the rest of its batch, counts it
    (loopwatch_events_failed_total) and carries on."""
    engine = running.engine
    record = engine.record
    left = [1]

    def flaky(event: Any) -> Any:
        if left[0] and type(event).__name__ == "Opened" and event.key.startswith("healthy"):
            left[0] = 0
            raise RuntimeError("brain bug (on purpose)")
        return record(event)

    engine.record = flaky  # type: ignore[method-assign]


def loopwatch_config(path: Path, backend_port: int, dead_port: int, redis_url: str) -> Path:
    config = {
        "state": {"backend": "redis", "redis": {"url": redis_url, "key_prefix": "lw-e2e:"}},
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "logging": {"level": "error"},
        "routes": [
            {"path_prefix": "/ws", "upstream": f"ws://127.0.0.1:{backend_port}"},
            # Plain HTTP: the demo backend's /healthz, for the plain request panels.
            {"path_prefix": "/api", "upstream": f"http://127.0.0.1:{backend_port}/healthz"},
            # Nothing listens there: every upgrade fails to connect.
            {"path_prefix": "/dead", "upstream": f"ws://127.0.0.1:{dead_port}"},
        ],
        "detection": {
            # Findings clear soon after the loop stops, so the alert resolves in seconds.
            "quiet_period": "2s",
            "rules": {
                name: {"window": "5s"}
                for name in ("auth_failure_loop", "rapid_reconnect", "short_lived", "no_backoff")
            },
            "max_clients": MAX_CLIENTS,
        },
        "policy": {
            # Keys from an unverified JWT are bound to the client's address.
            "allow": [f"{ALLOWED}@127.0.0.1"],
            # Refusals answered at once: the looping client keeps its own 50 ms pace
            # through its cooldown (the incident as the dashboard shows it, and
            # `loops > 20` below). With the default 2 s hold it makes one attempt per
            # hold; the hold has its own tests (test_hold.py, test_hold_browser.py).
            "hold": 0,
        },
        "breakers": {"upstream": {"window": "3s", "min_calls": 10}},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_loopwatch(config: Path, spans: ProcessSpanSink) -> AsyncIterator[Running]:
    settings = load_settings(config, env={})
    telemetry = Telemetry(settings, build_registry(), spans=spans, owns_spans=True)
    running = await start(settings, sources=ConfigSources(str(config), {}, {}), telemetry=telemetry)
    try:
        yield running
    finally:
        await running.close()


async def looping(url: str, stop: asyncio.Event) -> int:
    """The incident's client: reconnect 50 ms after every close, never backing off."""
    attempts = 0
    while not stop.is_set():
        attempts += 1
        with contextlib.suppress(WebSocketException, OSError, asyncio.TimeoutError):
            await attempt(url)
        await asyncio.sleep(0.05)
    return attempts


async def healthy(url: str, stop: asyncio.Event) -> int:
    """One long-lived connection exchanging a message every 100 ms."""
    exchanged = 0
    async with connect(url, open_timeout=5, close_timeout=2) as ws:
        while not stop.is_set():
            await ws.send(f"ping {exchanged}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"ping {exchanged}"
            exchanged += 1
            await asyncio.sleep(0.1)
    return exchanged


async def once_each(urls: list[str], concurrency: int = 20) -> int:
    """Every URL connected to once (opened, then closed by the client at once)."""
    gate = asyncio.Semaphore(concurrency)
    opened = 0

    async def one(url: str) -> None:
        nonlocal opened
        async with gate:
            with contextlib.suppress(WebSocketException, OSError, asyncio.TimeoutError):
                async with connect(url, open_timeout=5, close_timeout=2):
                    opened += 1

    await asyncio.gather(*(one(u) for u in urls))
    return opened


async def plain_requests(port: int, stop: asyncio.Event) -> None:
    """A REST client beside the WebSockets: a plain GET on /api every 100 ms
    until `stop`, for the plain request panels (their rate and quantiles)."""
    request = b"GET /api HTTP/1.1\r\nHost: lw.test\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        response, _ = await raw_exchange(port, request)
        assert response.status == 200, response.status_line
        await asyncio.sleep(0.1)


async def bad_requests(port: int) -> None:
    """BAD_REQUESTS smuggling-shaped heads, each answered 400 before detection."""
    for _ in range(BAD_REQUESTS):
        response, _ = await raw_exchange(port, SMUGGLING)
        assert response.status == 400, response.status_line
        await asyncio.sleep(0.2)  # spread over a second: seen by more than one scrape


def unseen_attempts(port: int, n: int) -> int:
    """`n` upgrade requests on /dead, each from a new client, one after another on
    blocking sockets (no event loop needed): the data plane answers each at once,
    refused by the open upstream breaker or 502 from the dead upstream. Returns how
    many were answered."""
    answered = 0
    for i in range(n):
        head = upgrade_request(f"/dead?token={issue_token(f'unseen-{i}', 60)}", "lw.test")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            answered += blocking_exchange(sock, head).startswith(b"HTTP/1.1 ")
    return answered


async def upstream_outage(running: Running, base: str, limit: int = 400) -> int:
    """Distinct clients on the dead route until the upstream breaker opens."""

    def breaker_state() -> str:
        views = {(b.route, b.name): b for b in running.engine.breakers(time.monotonic())}
        return str(views["/dead", "upstream"].state)  # the dead route's own breaker

    sent = 0
    while breaker_state() == "closed":
        assert sent < limit, (
            f"upstream breaker still closed after {sent} failed upstream handshakes"
        )
        batch = [f"{base}/dead?token={issue_token(f'outage-{sent + i}', 60)}" for i in range(20)]
        sent += len(batch)
        await once_each(batch)
    return sent


# --- the test ----------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_loop_alert_and_every_dashboard_query_against_real_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    began = time.monotonic()
    dashboard = json.loads(generate.DASHBOARD_FILE.read_text())
    dead_port = free_port()
    # Traces go to a span exporter process (dropping them) with a short queue, which
    # the session stalls for a while: the lost spans panel has something to show, and
    # the proxy goes on serving while its exporter is stuck.
    monkeypatch.setattr(span_export, "QUEUE_SPANS", 10)
    monkeypatch.setattr(native, "EventQueue", SmallQueue)
    spans = dropping_spans()
    assert spans.force_flush(30_000) and spans.child is not None and spans.child.stdin is not None
    fcntl.fcntl(spans.child.stdin.fileno(), fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: a page
    exporter_pid = spans.child.pid
    async with (
        demo_backend() as backend,
        running_loopwatch(
            loopwatch_config(tmp_path / "loopwatch.yaml", backend.port, dead_port, redis_server.url),
            spans,
        ) as running,
    ):
        failing = FailingObserver()
        running.observers.add(failing)
        fail_one_opened(running)
        instance = f"127.0.0.1:{running.admin_port}"
        base = f"ws://127.0.0.1:{running.proxy_port}"
        routes = [r.path_prefix for r in running.settings.effective_routes()]
        queries = dashboard_queries(dashboard, variable_sets(dashboard, instance, routes))

        with prometheus(tmp_path, instance) as (prom_base, prom_log):
            async with api(prom_base, prom_log) as prom:

                async def scraped() -> bool:
                    return bool(await prom.query(f'up{{job="{JOB}", instance="{instance}"}} == 1'))

                await poll(
                    scraped, 30, lambda: f"no successful scrape of {instance}:\n{prom.log_tail()}"
                )
                assert not await prom.alerts(ALERT), "the loop alert is active before any traffic"

                stop = asyncio.Event()
                traffic_began = time.monotonic()
                clients = [
                    asyncio.create_task(
                        healthy(f"{base}/ws?token={issue_token('healthy', 600)}", stop)
                    ),
                    asyncio.create_task(
                        looping(f"{base}/ws?token={issue_token('looper', -60)}", stop)
                    ),
                    asyncio.create_task(
                        looping(f"{base}/ws?token={issue_token(ALLOWED, -60)}", stop)
                    ),
                    asyncio.create_task(plain_requests(running.proxy_port, stop)),
                ]
                stop_queries = asyncio.Event()
                rounds = 0

                async def keep_querying() -> None:
                    nonlocal rounds
                    while not stop_queries.is_set():
                        await query_round(prom, queries)
                        rounds += 1
                        await asyncio.sleep(0.3)

                querying = asyncio.create_task(keep_querying())
                try:
                    # --- the loop alert: pending, then firing ---------------------------
                    states: dict[str, list[str]] = {}  # rule label -> states in order seen
                    firing: list[dict[str, Any]] = []

                    async def loop_alert_firing() -> bool:
                        for a in await prom.alerts(ALERT):
                            rule = a["labels"]["rule"]
                            seen = states.setdefault(rule, [])
                            if not seen or seen[-1] != a["state"]:
                                seen.append(a["state"])
                            if rule == "auth_failure_loop" and a["state"] == "firing":
                                firing.append(a)
                        return bool(firing)

                    await poll(
                        loop_alert_firing,
                        40,
                        lambda: f"{ALERT} not firing for auth_failure_loop; seen {states}",
                    )
                    assert states["auth_failure_loop"] == ["pending", "firing"], states
                    fired_after = time.monotonic() - began
                    alert = firing[0]
                    assert alert["labels"] == {
                        "alertname": ALERT,
                        "job": JOB,
                        "instance": instance,
                        "rule": "auth_failure_loop",
                        "severity": "critical",
                    }, alert["labels"]
                    assert alert["annotations"]["runbook_url"].endswith(
                        "docs/runbooks.md#loopwatchconnectionloopdetected"
                    )
                    assert (
                        f"flagged by auth_failure_loop on {instance}"
                        in alert["annotations"]["summary"]
                    ), alert

                    # --- the rest of the session: reload, storm, outage ------------------
                    os.kill(exporter_pid, signal.SIGSTOP)  # until after the outage
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(f"http://{instance}/api/reload") as response,
                    ):
                        assert response.status == 200, await response.text()
                    assert running.observers.errors[failing.name] == 1
                    # A fresh process judges no storm in its first two fleet windows
                    # (every client connects to it: detectors/fleet.py): past them.
                    warm_up = 2 * running.settings.detection.fleet.window + 1.0
                    await asyncio.sleep(max(0.0, traffic_began + warm_up - time.monotonic()))
                    storm = [
                        f"{base}/ws?token={issue_token(f'storm-{i}', 60)}"
                        for i in range(STORM_CLIENTS)
                    ]
                    opened = await once_each(storm)
                    assert opened >= 0.9 * STORM_CLIENTS, (
                        f"only {opened} of {STORM_CLIENTS} storm clients connected"
                    )
                    await bad_requests(running.proxy_port)
                    outage_attempts = await upstream_outage(running, base)
                    os.kill(exporter_pid, signal.SIGCONT)
                    assert spans.dropped > 0, "the stalled span exporter cost no spans"

                    # --- a stalled brain: this event loop (the brain's) blocked on purpose
                    # while another thread's clients are answered by the data plane.
                    with ThreadPoolExecutor(1) as pool:
                        answered = pool.submit(
                            unseen_attempts, running.proxy_port, UNSEEN_ATTEMPTS
                        ).result(timeout=60)
                    assert answered == UNSEEN_ATTEMPTS
                    dropped = running.plane.events_dropped()
                    assert dropped >= 2 * UNSEEN_ATTEMPTS - QUEUE_CAPACITY, dropped

                    # --- the shared state store lost, then back --------------------------
                    store = running.gate.state_store
                    assert store.up
                    redis_server.stop()

                    async def store_alert_firing() -> bool:
                        return any(
                            a["state"] == "firing" and a["labels"]["instance"] == instance
                            for a in await prom.alerts(STORE_ALERT)
                        )

                    await poll(
                        store_alert_firing,
                        30,
                        lambda: f"{STORE_ALERT} not firing; store up: {store.up}",
                    )
                    [store_alert] = await prom.alerts(STORE_ALERT)
                    assert store_alert["labels"] == {
                        "alertname": STORE_ALERT,
                        "job": JOB,
                        "instance": instance,
                        "severity": "warning",
                    }, store_alert["labels"]
                    assert not store.up and store.errors > 0
                    redis_server.start()

                    async def store_back() -> bool:
                        return bool(store.up)

                    await poll(store_back, 15, lambda: "the store did not reconnect")
                    # Batches it refuses (another program on its channel): the panel's
                    # refused series, a few seconds of it.
                    refused = sum(store.refused.values())
                    foreign = aioredis.Redis.from_url(redis_server.url)
                    try:
                        for _ in range(6):
                            await foreign.publish(store.channel, b"not a loopwatch batch")
                            await asyncio.sleep(0.5)
                    finally:
                        await foreign.aclose()
                    assert store.refused["malformed"] >= refused + 6

                    # --- every dashboard query, while the loop still runs ------------------
                    # A round that began after the session's last step must find a series for
                    # every query; a non-zero value may have been seen at any point.
                    first_round = rounds + 1

                    async def every_query_answers() -> bool:
                        if querying.done():
                            querying.result()  # raises what stopped it
                            raise AssertionError("the query task ended")
                        fresh = rounds > first_round
                        return fresh and all(q.nonzero and not q.empty for q in queries)

                    await poll(
                        every_query_answers,
                        30,
                        lambda: (
                            "dashboard queries without a single series in the last round:\n"
                            + (describe(queries, lambda q: bool(q.empty)) or "  (none)")
                            + "\ndashboard queries never seen with a non-zero value:\n"
                            + (describe(queries, lambda q: not q.nonzero) or "  (none)")
                        ),
                    )
                    assert all(not task.done() for task in clients), (
                        "a client stopped before the checks"
                    )
                    # Each bad request was counted once, as what it was.
                    [rejected] = await prom.query(
                        f'sum(loopwatch_requests_rejected_total{{instance="{instance}", '
                        f'reason="bad_request"}})'
                    )
                    assert float(rejected["value"][1]) == BAD_REQUESTS, rejected

                    # The template variables offer this job, this instance and every route.
                    offered = await variable_values(
                        prom, dashboard, variable_sets(dashboard, instance, routes)["all"]
                    )
                    assert offered == {
                        "job": {JOB},
                        "instance": {instance},
                        "route": set(routes),
                    }, offered
                finally:
                    os.kill(exporter_pid, signal.SIGCONT)
                    stop_queries.set()
                    stop.set()
                    await asyncio.gather(querying, return_exceptions=True)
                    results = await asyncio.wait_for(
                        asyncio.gather(*clients, return_exceptions=True), 30
                    )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                exchanged, loops, tolerated, _ = results  # the last: the plain requests
                assert exchanged > 10 and loops > 20 and tolerated > 20, results

                # Every rule evaluated, none in error, the shortened `for:` in place.
                groups = (await prom.get("/api/v1/rules"))["groups"]
                rules = [r for g in groups for r in g["rules"]]
                assert len(rules) == sum(1 for _ in promql.rules(generate.rule_groups())), rules
                broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
                assert not broken, f"rules failing in Prometheus: {broken}"
                long_for = [
                    r["name"] for r in rules if r["type"] == "alerting" and r["duration"] != 3
                ]
                assert not long_for, f"alerts without the test's `for: {SHORT_FOR}`: {long_for}"

                # --- the loop stopped: flags clear after the quiet period, the alert resolves
                stopped = time.monotonic()

                async def resolved() -> bool:
                    return not await prom.alerts(ALERT)

                await poll(resolved, 40, lambda: f"{ALERT} still active after the loop stopped")
                resolved_after = time.monotonic() - stopped

    print(
        f"\nfiring after {fired_after:.1f}s, resolved {resolved_after:.1f}s after the loop stopped, "
        f"{len(queries)} queries x {rounds} rounds, {outage_attempts} outage attempts, "
        f"total {time.monotonic() - began:.1f}s"
    )
    for q in queries:
        print(f"  {q.nonzero_at - began:5.1f}s [{q.panel}] {q.nonzero}")
