"""The fleet-wide view: attempt rate and auth-failure ratio over all clients.

Per-client rules ask "is this client looping?"; this asks "is everyone
reconnecting at once?". A backend restart closes every connection (1012) and
every client reconnects once: each client looks healthy (one attempt), but the
fleet's rate of *distinct clients* attempting jumps far above its baseline.
That is a *reconnect storm*, not a loop: it is exposed as ``storm`` for metrics
and alerts and never puts a client in cooldown. Clients are counted once per
window for the storm — one client looping at 50/s is a loop, not a storm — while
``rate`` counts every attempt.

Memory is bounded at any rate: counts live in time buckets
(``detectors.window``), and the baseline is an exponentially weighted average
of completed buckets' rates, with time constant ``baseline``.
"""

from __future__ import annotations

import math

from .settings import FleetSettings
from .window import SlidingCounter

_ATTEMPTS, _AUTH_FAILURES, _AUTH_OUTCOMES, _CLIENTS = 0, 1, 2, 3
_FIELDS = 4
_BUCKETS = 10


class Fleet:
    __slots__ = ("settings", "_window", "_bucket", "_bucket_count", "baseline", "storms", "_storming")

    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self._window = SlidingCounter(settings.window, fields=_FIELDS, buckets=_BUCKETS)
        self._bucket = -math.inf  # index of the bucket being filled, for the baseline
        self._bucket_count = 0
        self.baseline = 0.0  # distinct clients attempting, per second
        # Storms begun, judged at each bucket's end: a storm flag lasts seconds
        # (a restart's reconnects; the baseline soon takes the new rate in), less
        # than a scrape interval may show, so its start is counted.
        self.storms = 0
        self._storming = False

    def configure(self, settings: FleetSettings) -> None:
        if settings.window != self.settings.window:
            self._window = SlidingCounter(settings.window, fields=_FIELDS, buckets=_BUCKETS)
            self._bucket = -math.inf
            self._bucket_count = 0
        self.settings = settings

    def attempt(self, t: float, distinct: bool = True) -> None:
        """One attempt; `distinct` when its client had not attempted within the window."""
        self._roll(t)
        self._window.add(t, _ATTEMPTS)
        if distinct:
            self._bucket_count += 1
            self._window.add(t, _CLIENTS)

    def auth_outcome(self, t: float, failed: bool) -> None:
        self._window.add(t, _AUTH_OUTCOMES)
        if failed:
            self._window.add(t, _AUTH_FAILURES)

    def rate(self, t: float) -> float:
        """Attempts per second over the window."""
        return self._window.total(t, _ATTEMPTS) / self.settings.window

    def auth_failure_ratio(self, t: float) -> float:
        outcomes = self._window.total(t, _AUTH_OUTCOMES)
        return self._window.total(t, _AUTH_FAILURES) / outcomes if outcomes else 0.0

    def client_rate(self, t: float) -> float:
        """Distinct clients attempting per second over the window."""
        return self._window.total(t, _CLIENTS) / self.settings.window

    def baseline_at(self, t: float) -> float:
        self._roll(t)
        return self.baseline

    def storm(self, t: float) -> bool:
        """Distinct-client rate at least ``storm_factor`` × baseline and ``storm_min_rate``."""
        self._roll(t)
        return self._storm_now(t)

    def _storm_now(self, t: float) -> bool:
        rate = self.client_rate(t)
        s = self.settings
        return rate >= s.storm_min_rate and rate >= s.storm_factor * self.baseline

    def _roll(self, t: float) -> None:
        width = self._window.width
        bucket = math.floor(t / width)
        if bucket <= self._bucket:
            return
        if self._bucket != -math.inf:
            # Fold the finished bucket in, then decay for any empty buckets after it.
            alpha = 1.0 - math.exp(-width / self.settings.baseline)
            self.baseline += alpha * (self._bucket_count / width - self.baseline)
            empty = bucket - self._bucket - 1
            if empty > 0:
                self.baseline *= math.exp(-empty * width / self.settings.baseline)
            # The finished bucket ends at the new one's start: a storm then?
            storming = self._storm_now(bucket * width)
            if storming and not self._storming:
                self.storms += 1
            self._storming = storming
        self._bucket = bucket
        self._bucket_count = 0
