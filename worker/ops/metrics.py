"""Prometheus metrics, served on ``/metrics`` by the worker process.

The worker is one process (the consumer on its event loop, uploads on its thread pool), so
the counters live in memory and add up by themselves. The label ``stage`` says which side
counted: ``ingest`` (reading and batching) or ``delivery`` (validating and uploading). Every
metric of the upload side has the label ``account`` (the Netcore account's name, ``default``
for the one of ``NETCORE_API_KEY``; never its key); what ingest dead-letters before an event
has an account carries ``account=""``.

How they add up (``dead`` is ``events_dead_lettered_total``)::

    received = batched + dead{stage="ingest"}                          always
    batched  = valid + invalid{stage="delivery"}                       once each batch was tried
    valid    = delivered + dead{stage="delivery", not invalid/malformed}  once none awaits a retry
    so       received = delivered + dead (every reason and stage)

Redelivered messages (a crash, a lost connection) are counted again, like the duplicates they
are. The data path never imports this module: the consumer, delivery, the circuit and the flow
report through hooks, which :class:`MetricsListener` implements; the runtime wires them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from config.settings import Settings
from worker.clock import Clock
from worker.deadletter import envelopes
from worker.ingest.batching import Batcher
from worker.upload.circuit import Circuit
from worker.upload.delivery import Report
from worker.upload.lanes import Lanes

logger = logging.getLogger(__name__)

#: Every metric's name starts with this.
PREFIX = "netcore_activity_"

#: Values of the ``stage`` label: the consumer, the uploads.
INGEST, DELIVERY = "ingest", "delivery"

#: (stage, reason) of every invalid-event series, made at zero so that each one exists.
INVALID_SERIES = ((INGEST, "missing_asset_id"), (INGEST, "too_large"), (INGEST, envelopes.MALFORMED),
                  (DELIVERY, envelopes.INVALID), (DELIVERY, envelopes.MALFORMED))

#: Reasons ingest dead-letters for (``account=""``), and those delivery does (per account).
INGEST_REASONS = (envelopes.INVALID, envelopes.MALFORMED, envelopes.POISON, envelopes.UNHANDLED,
                  envelopes.UNROUTABLE)
DELIVERY_REASONS = tuple(r for r in envelopes.REASONS if r not in (envelopes.POISON, envelopes.UNROUTABLE))

#: Events per upload request: bisection makes small ones, full batches hold 1000.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 750, 1000)

#: Seconds per upload request, up to the longest ``UPLOAD_TIMEOUT`` worth telling apart.
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: The circuit's states as the ``circuit_state`` gauge reports them.
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "paused": 2, "open": 3}


class Metrics:
    """Every metric of the worker, in one registry (a fresh one per instance: tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=self.registry)

        account = ("account",)
        self.received = counter("events_received", "Events read from source messages.")
        self.batched = counter("events_batched", "Events put into a batch for upload.")
        self.valid = counter("events_valid", "Events valid on their batch's first attempt.", account)
        self.invalid = counter("events_invalid", "Events refused before any upload.", ("stage", "reason"))
        self.stale = counter("events_stale", "Valid events older than 24 hours: stored, no journey.", account)
        self.naive = counter("events_naive_timestamp", "Valid events whose timestamp has no zone (forwarded).",
                             account)
        self.delivered = counter("events_delivered", "Events the API accepted.", account)
        self.dead = counter("events_dead_lettered", "Dead letters written.", ("stage", "reason", "account"))
        self.retries = counter("retries_scheduled", "Retry messages published (batches put back in RabbitMQ).",
                               account)
        self.held = counter("events_held", "Events put back without spending an attempt (the API was down, or "
                                           "their asset_id is held).", account)
        self.uploads = counter("uploads", "Upload requests by HTTP status.", ("account", "status", "outcome"))
        self.batch_size = Histogram(PREFIX + "upload_batch_size", "Events per upload request.", account,
                                    registry=self.registry, buckets=BATCH_SIZE_BUCKETS)
        self.duration = Histogram(PREFIX + "upload_duration_seconds", "Seconds per upload request.", account,
                                  registry=self.registry, buckets=DURATION_BUCKETS)
        self.oldest_age = gauge("oldest_event_age_seconds", "Seconds the oldest buffered event has waited (at the "
                                                            "scrape: it grows if the consumer stops).")
        self.last_tick = gauge("consumer_last_tick_timestamp_seconds", "Unix time of the consumer's last tick (a "
                                                                       "stuck event loop stops it).")
        self.buffered = gauge("events_buffered", "Events waiting in open batches.")
        self.circuit_state = gauge("circuit_state", "An account's circuit: 0 closed, 1 half-open, 2 paused "
                                                    "(429), 3 open (its API is down).", account)
        self.circuit_opened = counter("circuit_opened", "Times an account's circuit opened (its API went down).",
                                      account)
        self.probes = counter("probes", "Probe requests to an API that was down, by result.", ("account", "result"))
        self.assets_held = gauge("assets_held", "asset_ids held: failing alone with no sign the API works.", account)
        self.in_flight = gauge("uploads_in_flight", "Upload requests in flight.", account)
        self.limit = gauge("upload_concurrency_limit", "The adaptive limit on upload requests in flight.", account)
        self.retries_waiting = gauge("retries_waiting", "Upload tasks waiting in an account's delay queues.",
                                     account)
        self.upload_queue = gauge("upload_queue_ready", "Upload tasks ready in an account's upload queue.", account)
        self.ingest_paused = gauge("ingest_paused", "1 while the consumer does not take new messages (the broker "
                                                    "does not confirm its hand-offs).")
        for series in INVALID_SERIES:
            self.invalid.labels(*series)
        for reason in INGEST_REASONS:
            self.dead.labels(INGEST, reason, "")
        #: Counts of the consumer's hot path, added up in plain ints and written once per tick.
        self._pending = {"received": 0, "batched": 0}
        #: (the batcher's clock, when its oldest open batch opened), as of the last tick.
        self._oldest: tuple[Clock, float] | None = None
        self.oldest_age.set_function(self._oldest_age)
        self._lock = threading.Lock()

    # --- the consumer ---------------------------------------------------------------------------

    def events_read(self, *, received: int, batched: int) -> None:
        self._pending["received"] += received
        self._pending["batched"] += batched

    def flush(self) -> None:
        """Write the hot path's counts (each tick; tests call it before reading a value)."""
        received, batched = self._pending["received"], self._pending["batched"]
        if received or batched:
            self._pending["received"] = self._pending["batched"] = 0
            self.received.inc(received)
            self.batched.inc(batched)

    def refused_in_ingest(self, invalid_reason: str) -> None:
        self.invalid.labels(INGEST, invalid_reason).inc()
        self.dead.labels(INGEST, envelopes.INVALID, "").inc()

    def unroutable(self) -> None:
        self.dead.labels(INGEST, envelopes.UNROUTABLE, "").inc()

    def unreadable(self, reason: str) -> None:
        self.received.inc()
        self.dead.labels(INGEST, reason, "").inc()
        if reason == envelopes.MALFORMED:
            self.invalid.labels(INGEST, reason).inc()

    def add_account(self, account: str) -> None:
        """Make every series of ``account`` at zero, so that each one exists from the start."""
        for reason in DELIVERY_REASONS:
            self.dead.labels(DELIVERY, reason, account)
        for result in ("ok", "failed"):
            self.probes.labels(account, result)
        for counter in (self.valid, self.stale, self.naive, self.delivered, self.retries, self.held,
                        self.circuit_opened):
            counter.labels(account)

    def observe_batcher(self, batcher: Batcher) -> None:
        """Each tick, after due batches left: the hot path's counts, then the open batches."""
        self.flush()
        opened = batcher.oldest_opened_at()
        self._oldest = None if opened is None else (batcher.clock, opened)
        self.buffered.set(batcher.buffered)
        self.last_tick.set(time.time())

    def _oldest_age(self) -> float:
        """At each scrape, from the oldest batch of the last tick: a consumer that stopped ticking
        shows an age that keeps growing, not the last value it wrote."""
        oldest = self._oldest
        return 0.0 if oldest is None else max(0.0, oldest[0].monotonic() - oldest[1])

    def salvaged(self, account: str | None, events: int) -> None:
        """Events of upload tasks the worker could not handle, written to the dead-letter queue by
        the salvage as ``unhandled``: counted once received, so counted here as delivery's."""
        self.dead.labels(DELIVERY, envelopes.UNHANDLED, account or "").inc(events)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One value, for tests and the benchmark."""
        return self.registry.get_sample_value(PREFIX + name, labels) or 0.0


class MetricsListener:
    """Counts what the consumer, delivery, the circuit and the flow report, through their hooks
    (the ``...Listener`` protocols of :mod:`worker.ingest.pipeline`, :mod:`worker.upload.delivery`,
    :mod:`worker.upload.circuit` and :mod:`worker.upload.flow`)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    # the consumer

    def events_read(self, *, received: int, batched: int) -> None:
        self.m.events_read(received=received, batched=batched)

    def refused_in_ingest(self, invalid_reason: str) -> None:
        self.m.refused_in_ingest(invalid_reason)

    def unroutable(self) -> None:
        self.m.unroutable()

    def unreadable(self, reason: str) -> None:
        self.m.unreadable(reason)

    def observe_batcher(self, batcher: Batcher) -> None:
        self.m.observe_batcher(batcher)

    def salvaged(self, account: str | None, events: int) -> None:
        self.m.salvaged(account, events)

    # delivery

    def request_done(self, *, account: str, status: str, outcome: str, events: int, seconds: float) -> None:
        self.m.uploads.labels(account, status, outcome).inc()
        self.m.batch_size.labels(account).observe(events)
        self.m.duration.labels(account).observe(seconds)

    def bundle_done(self, report: Report, *, first_attempt_events: int) -> None:
        m, account = self.m, report.account
        m.delivered.labels(account).inc(report.delivered)
        m.stale.labels(account).inc(report.stale)
        m.naive.labels(account).inc(report.naive)
        invalid = report.dead.get(envelopes.INVALID, 0) + report.dead.get(envelopes.MALFORMED, 0)
        m.valid.labels(account).inc(max(0, first_attempt_events - invalid))
        for reason, count in report.dead.items():
            m.dead.labels(DELIVERY, reason, account).inc(count)
            if (DELIVERY, reason) in INVALID_SERIES:
                m.invalid.labels(DELIVERY, reason).inc(count)
        m.retries.labels(account).inc(report.retry_messages)
        m.held.labels(account).inc(report.held)

    def gave_up(self, *, account: str, reason: str, status: int | None, asset_id: str, events: int,
                error: str) -> None:
        """Counted by :meth:`bundle_done`; Sentry and the logs hear of it elsewhere."""

    # the circuits

    def circuit_opened(self, *, account: str, failures: int, assets: int, last_error: str, probe_in: float) -> None:
        self.m.circuit_opened.labels(account).inc()

    def circuit_paused(self, *, account: str, seconds: float) -> None:
        """The state gauge says it."""

    def circuit_closed(self, *, account: str, open_for: float, probes: int) -> None:
        """The state gauge says it."""

    def probe_done(self, *, account: str, ok: bool, next_in: float | None) -> None:
        self.m.probes.labels(account, "ok" if ok else "failed").inc()

    def asset_held(self, *, account: str, asset_id: str, failures: int, last_error: str) -> None:
        """The assets_held gauge says it."""


def watch(gauge: Gauge, read: Callable[[], float]) -> None:
    """Have ``gauge`` read its value from ``read`` at each scrape."""
    gauge.set_function(read)


def watch_lanes(metrics: Metrics, lanes: Lanes) -> None:
    """The gauges of every account's lane, read at each scrape; its series made at zero."""
    for lane in lanes:
        name, circuit, concurrency = lane.name, lane.circuit, lane.concurrency
        metrics.add_account(name)
        watch(metrics.in_flight.labels(name), partial(getattr, concurrency, "in_flight"))
        watch(metrics.limit.labels(name), partial(getattr, concurrency, "limit"))
        watch(metrics.circuit_state.labels(name), partial(_state_value, circuit))
        watch(metrics.assets_held.labels(name), partial(getattr, circuit, "held_assets"))


def _state_value(circuit: Circuit) -> float:
    return CIRCUIT_STATES[circuit.state.value]


def setup(settings: Settings, metrics: Metrics) -> str | None:
    """Serve ``/metrics``; return its URL (None: off, or the port was taken).

    A port already taken does not stop the worker: delivering events matters more than
    counting them, so it says so at ERROR and runs on without the endpoint.
    """
    if not settings.metrics_port:
        logger.info("Metrics: off (METRICS_PORT=0)")
        return None
    host, port = settings.metrics_address, settings.metrics_port
    try:
        start_http_server(port, host, metrics.registry)
    except OSError as exc:
        logger.error("Metrics: cannot listen on %s:%d (%s): set METRICS_PORT to a free port, or 0 to turn "
                     "metrics off. The worker runs on without /metrics.", host, port, exc)
        return None
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    logger.info("Metrics: serving %s", url)
    return url
