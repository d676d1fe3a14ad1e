"""The circuit breaker: when the API is down, stop sending to it, hold the events, and probe.

An API that fails every request for minutes or hours is an outage, not a bad batch: retrying
each batch on its own would spend every batch's retry budget and dead-letter them all. So:

- **closed** (normal): every upload may go. Transient failures (5xx, 408, 429, timeouts,
  refused connections) are counted; a success resets the count. After
  :data:`FAILURES_TO_OPEN` failures in a row, from at least two different batches (one bad
  batch alone is that batch's problem), the circuit **opens**.
- **open**: no upload starts; the worker stops consuming the upload queue and stops turning
  source messages into upload tasks (:mod:`worker.upload.flow`), so events wait in RabbitMQ.
  After a probe interval (doubling from ``probe_base`` up to ``probe_max``) it turns
- **half-open**: exactly one upload, the probe, may go. Success closes the circuit (the
  concurrency ramps up again from one); failure opens it for the next, longer interval.
- **paused**: a 429 with ``Retry-After`` stops every upload to the API until that time (capped),
  then half-open. A rate limit is about the API, not about the batch that met it.

Uploads refused by an open circuit, failed probes and 429s do not count against a batch's
``UPLOAD_MAX_RETRIES`` (:meth:`Circuit.counts`): a batch is given up on only when it failed that
often while the circuit was closed, i.e. while other uploads were going through, or when it
waited longer than the retry window. Permits are per request, so a probe is one request.
Thread-safe: upload threads report, the worker's event loop polls (:meth:`Circuit.poll`).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from worker.clock import Clock

logger = logging.getLogger(__name__)

#: Transient failures in a row (no success between them) that open the circuit.
FAILURES_TO_OPEN = 5

#: ... coming from at least this many different batches: one batch failing alone is not an outage.
BATCHES_TO_OPEN = 2


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    PAUSED = "paused"


@dataclass(frozen=True)
class Permit:
    """Leave to send one request. ``probe``: the one request of a half-open circuit."""

    probe: bool = False


class CircuitListener(Protocol):
    """What the circuit tells the outside (logs, metrics, Sentry): see :mod:`worker.upload.events`."""

    def circuit_opened(self, *, failures: int, batches: int, last_error: str, probe_in: float) -> None: ...

    def circuit_paused(self, *, seconds: float) -> None: ...

    def circuit_closed(self, *, open_for: float, probes: int) -> None: ...

    def probe_done(self, *, ok: bool, next_in: float | None) -> None: ...


class Circuit:
    """See the module docstring."""

    def __init__(
        self,
        *,
        clock: Clock,
        probe_base: float,
        probe_max: float,
        failures_to_open: int = FAILURES_TO_OPEN,
        listeners: Sequence[CircuitListener] = (),
    ) -> None:
        self.clock = clock
        self.probe_base = max(0.01, probe_base)
        self.probe_max = max(self.probe_base, probe_max)
        self.failures_to_open = failures_to_open
        self.listeners = list(listeners)
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._failing_batches: set[Hashable] = set()
        self._interval = self.probe_base
        #: When the circuit may turn half-open (monotonic seconds).
        self._until = 0.0
        self._probing = False
        self._opened_at = 0.0
        self._probes = 0

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def poll(self) -> State:
        """Turn half-open when the wait is over; return the state (the event loop calls this)."""
        with self._lock:
            if self._state in (State.OPEN, State.PAUSED) and self.clock.monotonic() >= self._until:
                self._state = State.HALF_OPEN
                self._probing = False
            return self._state

    def wait_left(self) -> float:
        """Seconds until the circuit turns half-open (0 when closed or half-open)."""
        with self._lock:
            if self._state in (State.OPEN, State.PAUSED):
                return max(0.0, self._until - self.clock.monotonic())
            return 0.0

    def permit(self) -> Permit | None:
        """Leave for one request now, or None: the circuit refuses it (it does not count)."""
        with self._lock:
            if self._state is State.CLOSED:
                return Permit()
            if self._state is State.HALF_OPEN and not self._probing:
                self._probing = True
                self._probes += 1
                return Permit(probe=True)
            return None

    @contextmanager
    def request(self) -> Iterator[Permit | None]:
        """``permit()``, and a probe handed back if the request never reported (an error)."""
        permit = self.permit()
        try:
            yield permit
        finally:
            if permit is not None and permit.probe:
                with self._lock:
                    self._probing = False  # reported or not, another probe may go

    def succeeded(self, permit: Permit) -> None:
        """A request went through: the API works."""
        with self._lock:
            was = self._state
            self._failures = 0
            self._failing_batches.clear()
            if was is State.CLOSED or (was is State.PAUSED and not permit.probe):
                return  # a Retry-After holds, whatever answered meanwhile
            self._state = State.CLOSED
            self._interval = self.probe_base
            open_for, probes = self.clock.monotonic() - self._opened_at, self._probes
            self._probes = 0
        for listener in self.listeners:
            if permit.probe:
                listener.probe_done(ok=True, next_in=None)
            listener.circuit_closed(open_for=open_for, probes=probes)

    def failed(self, permit: Permit, *, batch: Hashable, error: str, retry_after: float | None = None) -> None:
        """A request failed transiently (``retry_after``: a 429's ``Retry-After``, seconds)."""
        now = self.clock.monotonic()
        opened: tuple[int, int] | None = None
        paused: float | None = None
        probe_next: float | None = None
        with self._lock:
            if retry_after is not None and retry_after > 0:
                wait = min(retry_after, self.probe_max)
                if self._state is State.CLOSED:
                    self._opened_at, self._probes = now, 0
                if self._state is not State.OPEN:
                    self._state = State.PAUSED
                self._until = max(self._until, now + wait)
                paused = wait
            if permit.probe:
                self._interval = min(self._interval * 2, self.probe_max)
                if self._state is not State.PAUSED:
                    self._state = State.OPEN
                self._until = max(self._until, now + self._interval)
                probe_next = self._until - now
            elif self._state is State.CLOSED:
                self._failures += 1
                self._failing_batches.add(batch)
                if self._failures >= self.failures_to_open and len(self._failing_batches) >= BATCHES_TO_OPEN:
                    opened = (self._failures, len(self._failing_batches))
                    self._state = State.OPEN
                    self._opened_at, self._probes = now, 0
                    self._interval = self.probe_base
                    self._until = now + self._interval
        for listener in self.listeners:
            if opened is not None:
                listener.circuit_opened(failures=opened[0], batches=opened[1], last_error=error,
                                        probe_in=self.probe_base)
            if paused is not None:
                listener.circuit_paused(seconds=paused)
            if probe_next is not None:
                listener.probe_done(ok=False, next_in=probe_next)

    @staticmethod
    def counts(permit: Permit, *, rate_limited: bool) -> bool:
        """Does this failure count against the batch's retry budget? Not a probe's, not a 429."""
        return not permit.probe and not rate_limited
