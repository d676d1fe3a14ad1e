"""One account's circuit breaker: when its API is down, stop sending, hold the events, probe.

Each Netcore account has its own (:mod:`worker.upload.lanes`): another account's outage, rate
limit or revoked key changes nothing here. Within an account, the question is always the same:
*does the API work?* A failure while the API accepts other uploads is the failing batch's own
problem; a failure with no sign of life from the API is an outage, waited out without spending
anything. So:

- **Counted or not** (:meth:`Circuit.counts`). A transient failure counts against its batch's
  ``UPLOAD_MAX_RETRIES`` only when the account had a success since the batch first failed (for
  a first failure: within the last probe interval): the API works, this batch (or its asset_id)
  is the problem, and it follows the retry policy to ``retries_exhausted``, whether or not the
  other asset_ids keep sending. Otherwise it costs no attempt, only time (the retry window).
  Probes and 429s never count, nor can anything count while the circuit is open: no request goes.
- **The account opens** after :data:`FAILURES_TO_OPEN` failures in a row spanning at least
  :data:`ASSETS_TO_OPEN` asset_ids, with no success between them: the API is down. **Open**: no
  upload starts, the account's upload consumer stops (its events wait in its RabbitMQ queues);
  after a probe interval (doubling from ``probe_base`` to ``probe_max``) it turns **half-open**:
  one upload, the probe, may go. Success closes it; failure opens it for longer.
- **An asset_id is held** when it alone keeps failing with no sign of life from the API
  (:data:`ASSET_FAILURES_TO_HOLD` uncounted failures in a row): its uploads wait without a
  request, but for one probe of its own per interval; the other asset_ids go on. Any success in
  the account releases every held asset_id (the API works: their failures count from then on).
  So one sick asset_id never stops the others, whether it started first, alone, or amid traffic,
  and an account with one asset_id still waits out an outage with one request per interval.
- **Paused**: a 429 stops every upload of the account until its ``Retry-After`` (capped at
  ``probe_max``), or, without one, for an interval doubling with each 429 in a row (from
  ``probe_base``); then half-open. A rate limit is about the account, not the batch that met it.

Permits are per request, so a probe is one request. Thread-safe: upload threads ask and report,
the event loop polls (:meth:`Circuit.poll`).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from worker.clock import Clock

logger = logging.getLogger(__name__)

#: Transient failures in a row (no success between them) that open an account's circuit ...
FAILURES_TO_OPEN = 5

#: ... coming from at least this many asset_ids: one asset_id failing alone is held, not an outage.
ASSETS_TO_OPEN = 2

#: Uncounted failures in a row of one asset_id (no success in the account meanwhile) that hold it.
ASSET_FAILURES_TO_HOLD = 3

#: Asset_ids remembered as failing at most (an outage of thousands of asset_ids opens the account).
MAX_TRACKED_ASSETS = 10_000


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    PAUSED = "paused"


@dataclass(frozen=True)
class Permit:
    """Leave to send one request for ``asset_id``. ``probe``: ``"account"`` (the one request of
    a half-open circuit), ``"asset"`` (a held asset_id's), or ``None``."""

    asset_id: str
    probe: str | None = None


class CircuitListener(Protocol):
    """What the circuit tells the outside (logs, metrics, Sentry), naming the account."""

    def circuit_opened(self, *, account: str, failures: int, assets: int, last_error: str,
                       probe_in: float) -> None: ...

    def circuit_paused(self, *, account: str, seconds: float) -> None: ...

    def circuit_closed(self, *, account: str, open_for: float, probes: int) -> None: ...

    def probe_done(self, *, account: str, ok: bool, next_in: float | None) -> None: ...

    def asset_held(self, *, account: str, asset_id: str, failures: int, last_error: str) -> None: ...


@dataclass
class _Hold:
    """One asset_id failing with no sign of life from the API."""

    failures: int = 0
    held: bool = False
    interval: float = 0.0
    until: float = 0.0
    probing: bool = False


class Circuit:
    """One account's breaker; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Clock,
        probe_base: float,
        probe_max: float,
        account: str = "default",
        failures_to_open: int = FAILURES_TO_OPEN,
        listeners: Sequence[CircuitListener] = (),
    ) -> None:
        self.clock = clock
        self.account = account
        self.probe_base = max(0.01, probe_base)
        self.probe_max = max(self.probe_base, probe_max)
        self.failures_to_open = failures_to_open
        self.listeners = list(listeners)
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures = 0
        self._failing_assets: set[str] = set()
        self._interval = self.probe_base
        #: When an open or paused circuit may turn half-open (monotonic seconds).
        self._until = 0.0
        self._probing = False
        self._opened_at = 0.0
        self._probes = 0
        #: 429s in a row without ``Retry-After``: each pauses twice as long as the one before.
        self._rate_limits = 0
        #: Unix time of the account's last success (None: none yet in this process).
        self._last_success: float | None = None
        self._holds: dict[str, _Hold] = {}

    # --- the event loop's view --------------------------------------------------------------

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def held_assets(self) -> int:
        """asset_ids held right now (failing alone, with no sign of life from the API)."""
        with self._lock:
            return sum(1 for hold in self._holds.values() if hold.held)

    def poll(self) -> State:
        """Turn half-open when the wait is over; return the state (the event loop calls this)."""
        with self._lock:
            if self._state in (State.OPEN, State.PAUSED) and self.clock.monotonic() >= self._until:
                self._state = State.HALF_OPEN
                self._probing = False
            return self._state

    def opened_for(self) -> float:
        """Seconds since the circuit left CLOSED (0 when closed)."""
        with self._lock:
            return 0.0 if self._state is State.CLOSED else self.clock.monotonic() - self._opened_at

    def wait_left(self, asset_id: str | None = None) -> float:
        """Seconds until an upload of ``asset_id`` may be tried again (0: now)."""
        with self._lock:
            now = self.clock.monotonic()
            if self._state in (State.OPEN, State.PAUSED):
                return max(0.0, self._until - now)
            hold = self._holds.get(asset_id) if asset_id is not None else None
            if self._state is State.CLOSED and hold is not None and hold.held:
                return max(0.0, hold.until - now)
            return 0.0

    # --- the upload threads' view -----------------------------------------------------------

    def permit(self, asset_id: str) -> Permit | None:
        """Leave for one request of ``asset_id`` now, or None: refused (it does not count)."""
        with self._lock:
            if self._state is State.HALF_OPEN:
                if self._probing:
                    return None
                self._probing = True
                self._probes += 1
                return Permit(asset_id, "account")
            if self._state is not State.CLOSED:
                return None
            hold = self._holds.get(asset_id)
            if hold is None or not hold.held:
                return Permit(asset_id)
            if hold.probing or self.clock.monotonic() < hold.until:
                return None
            hold.probing = True
            return Permit(asset_id, "asset")

    @contextmanager
    def request(self, asset_id: str) -> Iterator[Permit | None]:
        """``permit()``, and a probe handed back if the request never reported (an error)."""
        permit = self.permit(asset_id)
        try:
            yield permit
        finally:
            if permit is not None and permit.probe is not None:
                with self._lock:
                    self._release_probe(permit)

    def counts(self, permit: Permit, *, rate_limited: bool, since: float | None) -> bool:
        """Does this failure count against its batch's retries? Only when the API showed it works
        since the batch first failed (``since``, unix time; None: this is its first failure, then
        within the last probe interval), and never for a probe or a 429."""
        if permit.probe is not None or rate_limited:
            return False
        with self._lock:
            if self._last_success is None:
                return False
            after = since if since is not None else self.clock.now().timestamp() - self.probe_max
            return self._last_success > after

    def succeeded(self, permit: Permit) -> None:
        """A request went through: the API works."""
        with self._lock:
            was = self._state
            self._last_success = self.clock.now().timestamp()
            self._failures = 0
            self._failing_assets.clear()
            self._holds.clear()
            self._rate_limits = 0
            if was is State.CLOSED or (was is State.PAUSED and permit.probe != "account"):
                return  # a Retry-After holds, whatever answered meanwhile
            self._state = State.CLOSED
            self._interval = self.probe_base
            open_for, probes = self.clock.monotonic() - self._opened_at, self._probes
            self._probes = 0
        for listener in self.listeners:
            if permit.probe == "account":
                listener.probe_done(account=self.account, ok=True, next_in=None)
            listener.circuit_closed(account=self.account, open_for=open_for, probes=probes)

    def failed(self, permit: Permit, *, error: str, counted: bool, rate_limited: bool = False,
               retry_after: float | None = None) -> None:
        """A request failed transiently; ``counted``: what :meth:`counts` said of it;
        ``rate_limited``: a 429, with its ``Retry-After`` in seconds when it gave one."""
        now = self.clock.monotonic()
        opened: tuple[int, int] | None = None
        paused: float | None = None
        probe_next: float | None = None
        held: _Hold | None = None
        with self._lock:
            if rate_limited:
                paused = self._pause(now, retry_after)
            if permit.probe == "account":
                self._interval = min(self._interval * 2, self.probe_max)
                if self._state is not State.PAUSED:
                    self._state = State.OPEN
                self._until = max(self._until, now + self._interval)
                probe_next = self._until - now
            elif permit.probe == "asset":
                hold = self._holds.get(permit.asset_id)
                if hold is not None:
                    hold.interval = min(hold.interval * 2, self.probe_max)
                    hold.until, hold.probing = now + hold.interval, False
            elif self._state is State.CLOSED and not rate_limited:
                self._failures += 1
                if len(self._failing_assets) < MAX_TRACKED_ASSETS:
                    self._failing_assets.add(permit.asset_id)
                if self._failures >= self.failures_to_open and len(self._failing_assets) >= ASSETS_TO_OPEN:
                    opened = (self._failures, len(self._failing_assets))
                    self._open(now)
                elif not counted:
                    held = self._note_alone(permit.asset_id, now, error)
        for listener in self.listeners:
            if opened is not None:
                listener.circuit_opened(account=self.account, failures=opened[0], assets=opened[1], last_error=error,
                                        probe_in=self.probe_base)
            if paused is not None:
                listener.circuit_paused(account=self.account, seconds=paused)
            if probe_next is not None:
                listener.probe_done(account=self.account, ok=False, next_in=probe_next)
            if held is not None:
                listener.asset_held(account=self.account, asset_id=permit.asset_id, failures=held.failures,
                                    last_error=error)

    # --- inside the lock --------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self._state = State.OPEN
        self._opened_at, self._probes = now, 0
        self._interval = self.probe_base
        self._until = now + self._interval

    def _pause(self, now: float, retry_after: float | None) -> float:
        if retry_after is not None and retry_after > 0:
            wait = min(retry_after, self.probe_max)
        else:
            self._rate_limits += 1
            wait = min(self.probe_max, self.probe_base * 2 ** (self._rate_limits - 1))
        if self._state is State.CLOSED:
            self._opened_at, self._probes = now, 0
        if self._state is not State.OPEN:
            self._state = State.PAUSED
        self._until = max(self._until, now + wait)
        return wait

    def _note_alone(self, asset_id: str, now: float, error: str) -> _Hold | None:
        """An uncounted failure of ``asset_id``: held after enough in a row; returns the hold when
        this failure made it held."""
        hold = self._holds.get(asset_id)
        if hold is None:
            if len(self._holds) >= MAX_TRACKED_ASSETS:
                return None
            hold = self._holds[asset_id] = _Hold(interval=self.probe_base)
        hold.failures += 1
        if hold.held or hold.failures < ASSET_FAILURES_TO_HOLD:
            return None
        hold.held, hold.until = True, now + hold.interval
        return hold

    def _release_probe(self, permit: Permit) -> None:
        if permit.probe == "account":
            self._probing = False
        elif permit.probe == "asset":
            hold = self._holds.get(permit.asset_id)
            if hold is not None:
                hold.probing = False
