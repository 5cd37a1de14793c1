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

A fresh process has no history: from a baseline of 0, ordinary traffic of
``storm_min_rate`` distinct clients a second was a storm until the average
caught up, a minute and more, flapping as it came near (a soak found 4 storms
counted at every start, each an alert). So the baseline starts at the median
rate of the first window's buckets (a burst of clients connecting as the
process starts, as at a rollout, weighs no more than its share of them), and
storms are judged from the second window on, once that first window has slid
out. And a storm, once begun, lasts until the rate falls below half the rate
that began it (``_STORM_HOLD``): a rate hovering at the threshold is one storm,
not one each time it crosses.
"""

from __future__ import annotations

import math

from .settings import FleetSettings
from .window import SlidingCounter

_ATTEMPTS, _AUTH_FAILURES, _AUTH_OUTCOMES, _CLIENTS = 0, 1, 2, 3
_FIELDS = 4
_BUCKETS = 10
# A storm ends when the distinct-client rate falls below this share of the
# rate that would begin one (hysteresis).
_STORM_HOLD = 0.5


class Fleet:
    __slots__ = (
        "settings", "_window", "_bucket", "_bucket_count", "baseline", "storms", "_storming", "_first", "_seed",
    )  # fmt: skip

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
        self._first: float | None = None  # the first bucket's index: the warm-up counts from it
        self._seed: list[int] | None = []  # the first window's bucket counts; None once the baseline is seeded

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
        """Distinct-client rate at least ``storm_factor`` × baseline and
        ``storm_min_rate`` (half that, to go on), after the warm-up."""
        self._roll(t)
        return self._storm_now(t, self._storming)

    def _storm_now(self, t: float, storming: bool) -> bool:
        if self._seed is not None or self._first is None:
            return False
        if math.floor(t / self._window.width) < self._first + 2 * _BUCKETS:
            return False  # the first window still in view: a start, not a storm
        s = self.settings
        threshold = max(s.storm_min_rate, s.storm_factor * self.baseline)
        return self.client_rate(t) >= (_STORM_HOLD * threshold if storming else threshold)

    def _roll(self, t: float) -> None:
        width = self._window.width
        bucket = math.floor(t / width)
        if bucket <= self._bucket:
            return
        if self._first is None:
            self._first = bucket
        elif self._bucket == -math.inf:
            pass  # the window was made anew (configure): no bucket to fold in
        elif self._seed is not None:
            # Still the first window: its buckets' counts, empty ones too.
            gap = int(min(bucket - self._bucket - 1, _BUCKETS))
            self._seed += [self._bucket_count] + [0] * gap
            if len(self._seed) >= _BUCKETS:
                counts = sorted(self._seed[:_BUCKETS])
                self.baseline = (counts[(_BUCKETS - 1) // 2] + counts[_BUCKETS // 2]) / 2 / width
                self._seed = None
        else:
            # Fold the finished bucket in, then decay for any empty buckets after it.
            alpha = 1.0 - math.exp(-width / self.settings.baseline)
            self.baseline += alpha * (self._bucket_count / width - self.baseline)
            empty = bucket - self._bucket - 1
            if empty > 0:
                self.baseline *= math.exp(-empty * width / self.settings.baseline)
            # The finished bucket ends at the new one's start: a storm then?
            storming = self._storm_now(bucket * width, self._storming)
            if storming and not self._storming:
                self.storms += 1
            self._storming = storming
        self._bucket = bucket
        self._bucket_count = 0
