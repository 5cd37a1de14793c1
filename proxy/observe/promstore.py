"""Counters and histograms kept as plain numbers, exported at scrape time.

A prometheus_client `Counter` child takes a lock and makes three Python calls
per increment, a `Histogram` walks its buckets in Python; at thousands of
handshakes a second that was a measurable share of the proxy's CPU. Here an
increment is one dict operation and an observation one `bisect`, and the
families (with exemplars) are built only when Prometheus scrapes. Everything
runs on the event loop, scrapes included, so no lock is needed.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, Exemplar, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class Traced(Protocol):
    """What an exemplar points at (a connection's TraceContext): its id is
    formatted only if a scrape shows it."""

    @property
    def trace_id_hex(self) -> str: ...


Pending = tuple[Traced, float, float]  # (trace, value, unix time)


def _exemplar(pending: Pending | None) -> Exemplar | None:
    if pending is None:
        return None
    trace, value, when = pending
    return Exemplar({"trace_id": trace.trace_id_hex}, value, when)


class CounterStore:
    """A labelled counter: `values[labels] += n`; every series pre-created by `create`."""

    __slots__ = ("name", "doc", "labelnames", "values", "exemplars")

    def __init__(self, name: str, doc: str, *labelnames: str):
        self.name = name  # without _total
        self.doc = doc
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {}
        self.exemplars: dict[tuple[str, ...], Pending] = {}

    def create(self, *labels: str) -> None:
        self.values.setdefault(labels, 0)

    def add(self, labels: tuple[str, ...], amount: float = 1, trace: Traced | None = None) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount
        if trace is not None:
            self.exemplars[labels] = (trace, amount, time.time())

    def family(self) -> CounterMetricFamily:
        f = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        exemplars = self.exemplars
        for labels, value in self.values.items():
            f.add_metric(labels, value, exemplar=_exemplar(exemplars.get(labels)))
        return f


class HistogramStore:
    """A histogram by route: per-bucket counts, a sum, the latest exemplar per bucket."""

    __slots__ = ("name", "doc", "bounds", "les", "counts", "exemplars")

    def __init__(self, name: str, doc: str, bounds: Sequence[float]):
        self.name = name
        self.doc = doc
        self.bounds = tuple(bounds)  # finite upper bounds, ascending; +Inf is implied
        self.les = (*(floatToGoString(b) for b in self.bounds), "+Inf")
        # route -> the count in each bucket (not cumulative), then the sum: one
        # lookup per observation.
        self.counts: dict[str, list[float]] = {}
        self.exemplars: dict[str, list[Pending | None]] = {}  # route -> per bucket

    def create(self, routes: Iterable[str]) -> None:
        for route in routes:
            if route not in self.counts:
                self.counts[route] = [0] * (len(self.les) + 1)
                self.exemplars[route] = [None] * len(self.les)

    def observe(self, route: str, value: float, trace: Traced | None = None) -> None:
        counts = self.counts.get(route)
        if counts is None:
            self.create((route,))
            counts = self.counts[route]
        i = bisect.bisect_left(self.bounds, value)  # the first bound >= value: `le` is inclusive
        counts[i] += 1
        counts[-1] += value
        if trace is not None:
            self.exemplars[route][i] = (trace, value, time.time())

    def family(self) -> HistogramMetricFamily:
        f = HistogramMetricFamily(self.name, self.doc, labels=["route"])
        for route, counts in self.counts.items():
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            total: float = 0
            for le, n, pending in zip(self.les, counts[:-1], self.exemplars[route], strict=True):
                total += n
                exemplar = _exemplar(pending)
                buckets.append((le, total) if exemplar is None else (le, total, exemplar))
            f.add_metric([route], buckets, counts[-1])
        return f


__all__ = ["CounterStore", "HistogramStore"]
