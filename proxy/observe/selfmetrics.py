"""loopwatch's own health on /metrics: the process, the event loop, the build.

* ``process_*``: prometheus_client's standard ``ProcessCollector`` (CPU
  seconds, resident and virtual memory, open and maximum file descriptors,
  start time), read from ``/proc/self`` at each scrape. It covers the main
  process only, not the span exporter child (docs/tracing.md).
* ``loopwatch_event_loop_lag_seconds``: a histogram of how late the brain's
  event loop wakes a task that sleeps ``LAG_INTERVAL`` seconds. The data
  plane's event batches, the engine's wake-ups and table writes, every scrape
  and admin request wait on that loop (connections do not: the data plane
  runs on its own threads), so its lag is how much later a blocking call, a
  long collector pause or a saturated core makes detection act. One wake-up
  every half second: nothing next to the brain's own work.
* ``loopwatch_build_info`` labels (``build_labels``): the version, the data
  plane and the frame parser in use (``native`` and ``rust`` since there is one
  data plane; the labels stay for the dashboards and queries that read them).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ... import __version__
from ..dataplane.boundary import dataplane_build
from .logs import log_writer

# How often the lag monitor wakes up (seconds).
LAG_INTERVAL = 0.5
# Upper bounds of the lag histogram (seconds). uvloop's timers tick in whole
# milliseconds, so an idle loop sits in the first two buckets; 10 ms and up is
# a loop that every connection feels.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_METRIC = "loopwatch_event_loop_lag_seconds"
LAG_HELP = (
    f"How late the brain's event loop woke a task that sleeps {LAG_INTERVAL:g} s: "
    "the delay its next step (a batch of the data plane's events, a wake-up, a scrape) waited for."
)

def build_labels() -> dict[str, str]:
    """The labels of loopwatch_build_info: version, data plane, frame parser (as
    the data plane reports them, proxy/dataplane/boundary.py)."""
    build = dataplane_build()
    return {"version": __version__, "dataplane": build.dataplane, "frame_parser": build.frame_parser}


class LagHistogram:
    """Observations of the loop's lag: a count per bucket (not cumulative) and their sum."""

    def __init__(self, bounds: Sequence[float] = LAG_BUCKETS):
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"lag buckets must ascend strictly: {bounds!r}")
        self.bounds = tuple(bounds)  # finite upper bounds; +Inf is implied
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, lag: float) -> None:
        lag = max(lag, 0.0)  # a timer may fire a hair early: that is no lag
        self.counts[bisect.bisect_left(self.bounds, lag)] += 1  # `le` is inclusive
        self.total += lag

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self) -> HistogramMetricFamily:
        buckets = []
        cumulative = 0
        les = [*(floatToGoString(b) for b in self.bounds), "+Inf"]
        for le, n in zip(les, self.counts, strict=True):
            cumulative += n
            buckets.append((le, cumulative))
        return HistogramMetricFamily(LAG_METRIC, LAG_HELP, buckets=buckets, sum_value=self.total)


class LoopLagMonitor(Collector):
    """A task on the running loop that sleeps `interval` seconds, again and again,
    and records how much later than asked it woke up. Also the collector that
    exports what it recorded."""

    def __init__(self, interval: float = LAG_INTERVAL, bounds: Sequence[float] = LAG_BUCKETS):
        if not interval > 0:
            raise ValueError(f"lag interval must be > 0 seconds, got {interval!r}")
        self.interval = interval
        self.histogram = LagHistogram(bounds)
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start measuring on the running loop (once)."""
        if self._task is not None:
            raise RuntimeError("the event-loop lag monitor is already started")
        self._task = asyncio.get_running_loop().create_task(
            self._measure(), name="loopwatch-event-loop-lag"
        )

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _measure(self) -> None:
        # time.monotonic, not loop.time(): uvloop's loop time is cached per
        # iteration in whole milliseconds, which would hide the lag it measures.
        while True:
            due = time.monotonic() + self.interval
            await asyncio.sleep(self.interval)
            self.histogram.observe(time.monotonic() - due)

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(LAG_METRIC, LAG_HELP)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        yield self.histogram.family()


class LogLinesDropped(Collector):
    """Log lines lost (logs.LogWriter): stderr's reader did not keep up, or
    writing to it failed (a full disk)."""

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("loopwatch_log_lines_dropped", LOG_DROPPED_HELP, labels=["reason"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        writer = log_writer()
        family = CounterMetricFamily("loopwatch_log_lines_dropped", LOG_DROPPED_HELP, labels=["reason"])
        family.add_metric(["queue_full"], writer.dropped if writer is not None else 0)
        family.add_metric(["write_error"], writer.failed if writer is not None else 0)
        yield family


LOG_DROPPED_HELP = (
    "Log lines lost: the reader of loopwatch's stderr did not keep up (queue_full), "
    "or writing to stderr failed (write_error: a full disk)."
)


class SelfMetrics:
    """The process collector and the lag monitor on one registry: `start` on the
    running loop registers both, `stop` ends the task and unregisters them (so
    the registry can serve another start)."""

    def __init__(self, registry: CollectorRegistry, interval: float = LAG_INTERVAL):
        self.registry = registry
        self.process = ProcessCollector(registry=None)
        self.lag = LoopLagMonitor(interval)
        self.log = LogLinesDropped()
        self._registered: list[Collector] = []

    def start(self) -> None:
        if self._registered:
            raise RuntimeError("loopwatch's self metrics are already started")
        for collector in (self.process, self.lag, self.log):
            self.registry.register(collector)
            self._registered.append(collector)
        self.lag.start()

    async def stop(self) -> None:
        await self.lag.stop()
        while self._registered:
            self.registry.unregister(self._registered.pop())


__all__ = [
    "LAG_BUCKETS",
    "LAG_INTERVAL",
    "LagHistogram",
    "LoopLagMonitor",
    "SelfMetrics",
    "build_labels",
]
