"""loopwatch's own health on /metrics (proxy/observe/selfmetrics.py): the process
collector, the event-loop lag histogram and the build_info labels, measured on
a real loop and scraped from a real `loopwatch run`."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from websockets.asyncio.client import ClientConnection, connect

from loopwatch.proxy.observe.selfmetrics import (
    LAG_BUCKETS,
    LagHistogram,
    LoopLagMonitor,
    SelfMetrics,
    build_labels,
)
from tests.conftest import echo, loopwatch, websockets_backend
from tests.test_lifecycle import MARGIN, SUBPROCESS, loopwatch_process

RUN_ON_UVLOOP = True  # in-process tests on asyncio's loop and on uvloop (tests/conftest.py)

PROCESS_FAMILIES = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
}
LAG = "loopwatch_event_loop_lag_seconds"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def lag_above(histogram_text: str, bound: float) -> float:
    """Observations of the lag histogram greater than `bound` (one of its bucket bounds)."""
    s = samples(histogram_text)
    le = str(bound)
    return s[f"{LAG}_count", frozenset()] - s[f"{LAG}_bucket", frozenset({("le", le)})]


# --- the histogram ----------------------------------------------------------------


class _Fixed(Collector):
    """Exports one histogram as it stands."""

    def __init__(self, histogram: LagHistogram):
        self.histogram = histogram

    def collect(self) -> Iterator[Metric]:
        yield self.histogram.family()


def test_lag_histogram_buckets_are_inclusive_and_cumulative() -> None:
    h = LagHistogram((0.01, 0.1, 1.0))
    for lag in (-0.002, 0.0, 0.01, 0.05, 0.1, 0.5, 3.0):
        h.observe(lag)
    registry = CollectorRegistry()
    registry.register(_Fixed(h))
    s = samples(generate_latest(registry).decode())
    bucket = lambda le: s[f"{LAG}_bucket", frozenset({("le", le)})]  # noqa: E731
    # A timer that fired early is no lag (0); `le` includes its bound.
    assert bucket("0.01") == 3
    assert bucket("0.1") == 5
    assert bucket("1.0") == 6
    assert bucket("+Inf") == 7
    assert s[f"{LAG}_count", frozenset()] == 7 == h.count
    assert s[f"{LAG}_sum", frozenset()] == pytest.approx(0.01 + 0.05 + 0.1 + 0.5 + 3.0)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.01), (0.1, 0.1)])
def test_lag_histogram_refuses_bad_buckets(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="ascend strictly"):
        LagHistogram(bounds)


@pytest.mark.parametrize("interval", [0, -1.0, float("nan")])
def test_lag_monitor_refuses_a_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="interval"):
        LoopLagMonitor(interval)


def test_build_labels_name_the_data_plane_and_its_parser() -> None:
    labels = build_labels()
    assert set(labels) == {"version", "dataplane", "frame_parser"}
    assert (labels["dataplane"], labels["frame_parser"]) == ("native", "rust")


# --- the monitor on a real loop ------------------------------------------------------


async def test_a_blocked_loop_shows_as_lag() -> None:
    registry = CollectorRegistry(auto_describe=True)
    monitor = LoopLagMonitor(interval=0.05)
    registry.register(monitor)
    monitor.start()
    try:
        deadline = time.monotonic() + 10
        while monitor.histogram.count < 3:  # a few wake-ups first: the task runs
            assert time.monotonic() < deadline, "the lag monitor never woke up"
            await asyncio.sleep(0.05)
        time.sleep(0.4)  # a blocking call on the event loop, as a bug would make
        before = monitor.histogram.count
        while monitor.histogram.count == before:
            assert time.monotonic() < deadline, "no wake-up after the block"
            await asyncio.sleep(0.01)
        blocked = generate_latest(registry).decode()
    finally:
        await monitor.stop()
    # The wake-up due during the block came at least 0.35 s late (it was due at
    # most 0.05 s into the 0.4 s block).
    assert lag_above(blocked, 0.25) >= 1, blocked
    assert samples(blocked)[f"{LAG}_sum", frozenset()] >= 0.35


async def test_stop_ends_the_task_and_nothing_is_measured_after() -> None:
    monitor = LoopLagMonitor(interval=0.02)
    monitor.start()
    with pytest.raises(RuntimeError, match="already started"):
        monitor.start()
    await asyncio.sleep(0.1)
    assert monitor.running
    await monitor.stop()
    assert not monitor.running
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loopwatch-event-loop-lag"]
    count = monitor.histogram.count
    await asyncio.sleep(0.1)
    assert monitor.histogram.count == count
    await monitor.stop()  # a second stop is harmless


async def test_self_metrics_register_on_start_and_leave_on_stop() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metrics = SelfMetrics(registry, interval=0.02)
    assert generate_latest(registry) == b""
    metrics.start()
    try:
        await asyncio.sleep(0.1)
        exposed = families(generate_latest(registry).decode())
        assert exposed == {**PROCESS_FAMILIES, LAG: "histogram", "loopwatch_log_lines_dropped": "counter"}
    finally:
        await metrics.stop()
    assert generate_latest(registry) == b""
    # The same registry takes a new start (a second loopwatch in one process).
    again = SelfMetrics(registry, interval=0.02)
    again.start()
    await again.stop()


async def test_loopwatch_stops_its_lag_monitor_on_shutdown() -> None:
    async with websockets_backend(echo) as (url, _), loopwatch(url) as running:
        assert running.self_metrics is not None
        monitor = running.self_metrics.lag
        assert monitor.running
        registry = running.admin.registry
    assert not monitor.running
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loopwatch-event-loop-lag"]
    assert LAG not in families(generate_latest(registry).decode())


# --- a real `loopwatch run` -----------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, admin_port: int) -> str:
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        assert response.status == 200
        return await response.text()


@contextlib.asynccontextmanager
async def open_sockets(url: str, n: int) -> AsyncIterator[list[ClientConnection]]:
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url, open_timeout=5)) for _ in range(n)]
        for i, ws in enumerate(sockets):  # relayed for real, both legs open
            await ws.send(f"hello {i}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"hello {i}"
        yield sockets


@SUBPROCESS
async def test_loopwatch_run_exposes_its_process_loop_and_build() -> None:
    relayed = 20
    async with (
        websockets_backend(echo) as (url, _),
        loopwatch_process(url) as p,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        started = time.time()
        first = await scrape(session, p.admin_port)
        assert families(first).items() >= {**PROCESS_FAMILIES, LAG: "histogram"}.items()
        s = samples(first)
        one = lambda name: s[name, frozenset()]  # noqa: E731

        # The process: its own numbers, read from /proc by the collector.
        assert one("process_resident_memory_bytes") > 10 * 2**20  # a Python process with its deps
        assert one("process_virtual_memory_bytes") >= one("process_resident_memory_bytes")
        assert one("process_cpu_seconds_total") > 0
        assert one("process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # inherited
        assert started - 60 < one("process_start_time_seconds") <= started + 1

        # Each relayed WebSocket holds two descriptors in loopwatch: client and upstream.
        idle_fds = one("process_open_fds")
        async with open_sockets(f"ws://127.0.0.1:{p.proxy_port}/", relayed):
            busy_fds = samples(await scrape(session, p.admin_port))["process_open_fds", frozenset()]
        assert busy_fds - idle_fds >= 2 * relayed, (idle_fds, busy_fds)

        # The lag monitor keeps measuring, twice a second.
        await asyncio.sleep(1.6)
        later = samples(await scrape(session, p.admin_port))
        lag_count = lambda x: x[f"{LAG}_count", frozenset()]  # noqa: E731
        assert lag_count(later) - lag_count(s) >= 2
        assert later[f"{LAG}_bucket", frozenset({("le", "+Inf")})] == lag_count(later)
        assert [str(b) for b in LAG_BUCKETS] == [
            dict(labels)["le"]
            for name, labels in later
            if name == f"{LAG}_bucket" and dict(labels)["le"] != "+Inf"
        ]

        # build_info names the data plane and the frame parser the process runs.
        [build] = [labels for name, labels in later if name == "loopwatch_build_info"]
        assert dict(build) == {
            "version": build_labels()["version"],
            "dataplane": "native",
            "frame_parser": "rust",
        }

        # promtool lints the whole scrape, loopwatch's own families included.
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: make test installs the Debian package prometheus"
        text = await scrape(session, p.admin_port)
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
        )
        assert lint.returncode == 0, lint.stdout + lint.stderr

        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(p.proc.wait(), 10 + MARGIN) == 0
