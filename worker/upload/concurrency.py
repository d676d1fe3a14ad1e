"""How many uploads to keep in flight: adaptive, additive increase and multiplicative decrease.

The real API is 100-300 ms away, so one request at a time would leave the worker idle most
of the time; too many at once would overload a struggling API and invite 429s. The limit
adapts, as Vector's adaptive request concurrency and TCP's congestion control do:

- time is cut into windows about one round trip long (:data:`MIN_WINDOW` at least);
- at the end of a window, if a request met back-pressure (429, 5xx, 408, a timeout, a refused
  connection) or the window's mean round-trip time grew past the usual one by more than
  :data:`DEVIATION_SCALE` deviations, the limit is multiplied by :data:`DECREASE` (at least 1);
- otherwise, if the limit was reached during the window (so it was what held the worker back),
  it grows: doubling while in *slow start* (from a cold start or after an outage, so a fast
  API is used fully within a second), then by one per window.

The limit never passes ``ceiling`` (``UPLOAD_CONCURRENCY``, the pool's threads). The worker's
event loop applies it as the prefetch of the upload queue (:mod:`worker.upload.flow`): RabbitMQ
hands over no more upload tasks than the limit, so none waits unacknowledged for a turn.
"""

from __future__ import annotations

import math
import threading

from worker.clock import Clock

#: Factor applied to the limit on back-pressure (Vector's default).
DECREASE = 0.9

#: Weight of the newest window in the moving averages of round-trip time and its deviation.
EWMA_WEIGHT = 0.4

#: A window's mean round-trip time above the average by this many deviations is congestion.
DEVIATION_SCALE = 2.5

#: Shortest window, seconds: on a very fast API, a window still holds enough requests to judge.
MIN_WINDOW = 0.05


class AdaptiveConcurrency:
    """The limit on uploads in flight; see the module docstring. Thread-safe."""

    def __init__(self, *, ceiling: int, clock: Clock, initial: int = 1) -> None:
        self.ceiling = max(1, ceiling)
        self.initial = max(1, min(initial, self.ceiling))
        self.clock = clock
        self._lock = threading.Lock()
        self._limit = self.initial
        self._slow_start = True
        self._in_flight = 0
        self._past_rtt: float | None = None
        self._deviation = 0.0
        self._window_start = clock.monotonic()
        self._window_rtts = 0.0
        self._window_count = 0
        self._window_peak = 0
        self._window_congested = False

    @property
    def limit(self) -> int:
        with self._lock:
            return self._limit

    @property
    def round_trip(self) -> float | None:
        """The moving average of a request's round trip, seconds; before the first window
        closed, the mean of the requests ended so far in it (None before any ended)."""
        with self._lock:
            if self._past_rtt is None and self._window_count:
                return self._window_rtts / self._window_count
            return self._past_rtt

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def started(self) -> float:
        """A request starts; returns its start time, for :meth:`finished`."""
        with self._lock:
            self._in_flight += 1
            self._window_peak = max(self._window_peak, self._in_flight)
            return self.clock.monotonic()

    def finished(self, started_at: float, *, congested: bool) -> None:
        """A request ended (``congested``: the API pushed back, or it timed out or failed to connect)."""
        now = self.clock.monotonic()
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            if congested:
                self._window_congested = True
            else:
                self._window_rtts += now - started_at
                self._window_count += 1
            window = max(MIN_WINDOW, self._past_rtt or 0.0)
            if now - self._window_start >= window:
                self._end_window(now)

    def restart(self) -> None:
        """After an outage: start again from the initial limit, in slow start."""
        with self._lock:
            self._limit = self.initial
            self._slow_start = True
            self._window_congested = False
            self._window_rtts, self._window_count, self._window_peak = 0.0, 0, self._in_flight
            self._window_start = self.clock.monotonic()

    def _end_window(self, now: float) -> None:
        mean = self._window_rtts / self._window_count if self._window_count else None
        past = self._past_rtt
        slower = mean is not None and past is not None and mean > past + DEVIATION_SCALE * max(
            self._deviation, 0.05 * past)
        if self._window_congested or slower:
            self._limit = max(1, math.floor(self._limit * DECREASE))
            self._slow_start = False
        elif self._window_peak >= self._limit:
            self._limit = min(self.ceiling, self._limit * 2 if self._slow_start else self._limit + 1)
        if mean is not None:
            if past is None:
                self._past_rtt = mean
            else:
                self._deviation += EWMA_WEIGHT * (abs(mean - past) - self._deviation)
                self._past_rtt = past + EWMA_WEIGHT * (mean - past)
        self._window_start = now
        self._window_rtts, self._window_count = 0.0, 0
        self._window_peak = self._in_flight
        self._window_congested = False
