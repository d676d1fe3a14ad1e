"""Time, injectable: production code asks a :class:`Clock`, tests move a :class:`ManualClock`."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    """Where batching and backoff get the time from."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines)."""

    def now(self) -> datetime:
        """The wall-clock time, aware, in UTC (timestamps in dead letters, stale events)."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class ManualClock:
    """A clock that moves only when told to: batching and backoff tests never sleep."""

    def __init__(self, start: float = 1000.0, wall: datetime | None = None) -> None:
        self._start = self._t = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=timezone.utc)

    def monotonic(self) -> float:
        return self._t

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=self._t - self._start)

    def advance(self, seconds: float) -> None:
        self._t += seconds
