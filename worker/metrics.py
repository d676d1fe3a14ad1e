"""Prometheus metrics that add up under the prefork pool, served on ``/metrics``.

The main process reads and batches (:mod:`worker.ingest`), pool processes validate and upload
(:mod:`worker.delivery`). Each counts what it does in its own files (prometheus_client's
multiprocess mode, in a directory made fresh at start-up); the main process serves the sums.
The label ``stage`` says which side counted: ``ingest`` (main) or ``delivery`` (pool).

Main process:
  - ``events_received_total``: events read from source messages; an unreadable message
    (``malformed``, ``poison``) counts as one, since it becomes one dead letter.
  - ``events_batched_total``: events put into a batch, on their way to the pool.
  - ``events_invalid_total{stage="ingest"}``: ``unroutable``, ``too_large``, ``malformed``.
  - ``events_dead_lettered_total{stage="ingest"}``: the dead letters of the above.
  - ``oldest_event_age_seconds``, ``events_buffered``: gauges of the open batches, each tick.
Pool processes:
  - ``events_valid_total``: events that passed validation on their batch's first attempt.
  - ``events_invalid_total{stage="delivery"}``: ``invalid`` (the API's rules), ``malformed``.
  - ``events_stale_total``: valid events older than 24 hours (stored, but no journey).
  - ``events_delivered_total``, ``retries_scheduled_total`` (batches),
    ``events_dead_lettered_total{stage="delivery"}``: once the broker confirmed the attempt's
    messages (a batch handed back to the broker is counted when it is redone).
  - ``uploads_total{status,outcome}``, ``upload_batch_size``, ``upload_duration_seconds``:
    per HTTP request, whatever became of it (``status`` is ``error`` with no answer; a
    success is 200, as in the batch log line: the client does not say which 2xx).

How they add up (``dead`` is ``events_dead_lettered_total``)::

    received = batched + dead{stage="ingest"}                          always
    batched  = valid + invalid{stage="delivery"}                       once each batch was tried
    valid    = delivered + dead{stage="delivery", not invalid/malformed}  once none awaits a retry
    so       received = delivered + dead (every reason and stage)

Redelivered messages (a crash, a lost connection) are counted again, like the duplicates they
are; a batch whose first attempt hit an unexpected error (logged) misses its valid count.
Metrics are made on first use, after the process chose files or memory (tests, tools).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker import deadletter
from worker.errors import Transient, UploadError

if TYPE_CHECKING:
    from config.settings import Settings
    from worker.batching import Batcher
    from worker.delivery import Report
    from worker.publisher import Outgoing

logger = logging.getLogger(__name__)

#: Every metric's name starts with this.
PREFIX = "netcore_activity_"

#: The variable prometheus_client reads to find the multiprocess directory.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: A worker's multiprocess directory (in the temp dir): this, its main process's pid, "-", random.
DIRECTORY_PREFIX = "netcore-activity-metrics-"

#: Values of the ``stage`` label: the main process, the pool processes.
INGEST, DELIVERY = "ingest", "delivery"

#: (stage, reason) of every invalid-event series, made at zero so that each one exists.
INVALID_SERIES = ((INGEST, "unroutable"), (INGEST, "too_large"), (INGEST, deadletter.MALFORMED),
                  (DELIVERY, deadletter.INVALID), (DELIVERY, deadletter.MALFORMED))

#: (stage, reason) of every dead-letter series, made at zero too.
DEAD_SERIES = tuple((INGEST, r) for r in (deadletter.INVALID, deadletter.MALFORMED, deadletter.POISON)) + tuple(
    (DELIVERY, r) for r in deadletter.REASONS if r != deadletter.POISON)

#: Events per upload request: bisection makes small ones, full batches hold 1000.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 750, 1000)

#: Seconds per upload request, up to the longest ``UPLOAD_TIMEOUT`` worth telling apart.
DURATION_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Poster(Protocol):
    """What :func:`timed_post` needs of :class:`~worker.client.ApiClient`."""

    def post(self, events: Sequence[Any]) -> None: ...


class _Metrics:
    """Every metric, made together once the process knows whether it writes files."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            # livemax: only the main process sets them; pool processes' zeros never win
            return Gauge(PREFIX + name, doc, registry=registry, multiprocess_mode="livemax")

        self.received = counter("events_received", "Events read from source messages (main process).")
        self.batched = counter("events_batched", "Events put into a batch for the pool (main process).")
        self.valid = counter("events_valid", "Events valid on their batch's first attempt (pool).")
        self.invalid = counter("events_invalid", "Events refused before any upload.", ("stage", "reason"))
        self.stale = counter("events_stale", "Valid events older than 24 hours: stored, no journey (pool).")
        self.delivered = counter("events_delivered", "Events the API accepted (pool).")
        self.dead = counter("events_dead_lettered", "Dead letters written.", ("stage", "reason"))
        self.retries = counter("retries_scheduled", "Batches scheduled for a retry (pool).")
        self.uploads = counter("uploads", "Upload requests by HTTP status (pool).", ("status", "outcome"))
        self.batch_size = Histogram(PREFIX + "upload_batch_size", "Events per upload request (pool).",
                                    registry=registry, buckets=BATCH_SIZE_BUCKETS)
        self.duration = Histogram(PREFIX + "upload_duration_seconds", "Seconds per upload request (pool).",
                                  registry=registry, buckets=DURATION_BUCKETS)
        self.oldest_age = gauge("oldest_event_age_seconds", "Seconds the oldest buffered event has waited.")
        self.buffered = gauge("events_buffered", "Events waiting in open batches (main process).")
        for series in INVALID_SERIES:
            self.invalid.labels(*series)
        for series in DEAD_SERIES:
            self.dead.labels(*series)


_lock = threading.Lock()
_metrics: _Metrics | None = None
_registry = CollectorRegistry()
_directory: str | None = None  #: the multiprocess directory, when this process (or its parent) chose one


def _m() -> _Metrics:
    """This process's metrics, made on first use (after :func:`setup`, in the worker)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = _Metrics(_registry)
        return _metrics


def use_directory(directory: str | None) -> None:
    """Write metrics as files in ``directory`` (None: back to in-memory values); forget the
    metrics made so far.

    prometheus_client picks how values are stored when it is first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; the worker imports it long before it knows the directory,
    so the choice is made again here, before any metric exists.
    """
    global _metrics, _registry, _directory
    with _lock:
        if directory is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = directory
        values.ValueClass = values.get_value_class()
        _metrics, _registry, _directory = None, CollectorRegistry(), directory
        _pending["received"] = _pending["batched"] = 0  # not yet written: they belonged to the old ones


def registry() -> CollectorRegistry:
    """What to expose: every process's files in multiprocess mode, else this process's values."""
    merged = _registry if _directory is None else CollectorRegistry()
    if _directory is not None:
        MultiProcessCollector(merged, path=_directory)
    return merged


def setup(settings: Settings) -> str | None:
    """Serve ``/metrics`` from the main process; return its URL (None: off, or it failed).

    Called at ``worker_init``, before the pool is forked, so that every pool process inherits
    the directory. A port already taken does not stop the worker: delivering events matters
    more than counting them, so it says so at ERROR and runs on without the endpoint.
    """
    if not settings.metrics_port:
        logger.info("Metrics: off (METRICS_PORT=0)")
        return None
    _remove_leftovers(Path(tempfile.gettempdir()))
    directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-")
    exposed = CollectorRegistry()
    MultiProcessCollector(exposed, path=directory)
    host, port = settings.metrics_address, settings.metrics_port
    try:
        start_http_server(port, host, exposed)
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        logger.error("Metrics: cannot listen on %s:%d (%s): set METRICS_PORT to a free port, or 0 to turn "
                     "metrics off. The worker runs on without /metrics.", host, port, exc)
        return None
    use_directory(directory)
    atexit.register(_remove, directory, os.getpid())
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    logger.info("Metrics: serving %s", url)
    return url


def _remove(directory: str, owner: int) -> None:
    """Remove the directory when the main process exits (forked children inherit atexit)."""
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def _remove_leftovers(parent: Path) -> None:
    """Remove what killed workers (SIGKILL: no atexit) left: only this user's, of dead pids."""
    for path in parent.glob(DIRECTORY_PREFIX + "*"):
        pid = path.name.removeprefix(DIRECTORY_PREFIX).split("-", 1)[0]
        try:
            if pid.isdigit() and not path.is_symlink() and path.stat().st_uid == os.getuid():
                os.kill(int(pid), 0)  # raises ProcessLookupError when no such process exists
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive but another user's, or removed meanwhile: not ours to touch
            pass


def process_dead(pid: int | None = None) -> None:
    """A pool process ends (``worker_process_shutdown``): drop its live gauges' files."""
    if _directory is not None:
        mark_process_dead(os.getpid() if pid is None else pid, _directory)


# --- the main process ---------------------------------------------------------------------------


#: Counts of the main process's hot path, added up in plain ints and written to the
#: (file-backed, locked) metrics once per tick: writing them per message cost about 10% of
#: the consumer's time.
_pending = {"received": 0, "batched": 0}


def events_read(*, received: int, batched: int) -> None:
    """A message held ``received`` events, ``batched`` now in batches (others: :func:`refused_in_ingest`)."""
    _pending["received"] += received
    _pending["batched"] += batched


def flush() -> None:
    """Write the hot path's counts (each tick; tests call it before reading a value)."""
    received, batched = _pending["received"], _pending["batched"]
    if received or batched:
        _pending["received"] = _pending["batched"] = 0
        _m().received.inc(received)
        _m().batched.inc(batched)


def refused_in_ingest(invalid_reason: str) -> None:
    """One event dead-lettered as ``invalid`` by the main process (``unroutable``, ``too_large``)."""
    metrics = _m()
    metrics.invalid.labels(INGEST, invalid_reason).inc()
    metrics.dead.labels(INGEST, deadletter.INVALID).inc()


def unreadable(reason: str) -> None:
    """A whole message dead-lettered as ``reason`` (``malformed``, ``poison``): one event's worth."""
    metrics = _m()
    metrics.received.inc()
    metrics.dead.labels(INGEST, reason).inc()
    if reason == deadletter.MALFORMED:
        metrics.invalid.labels(INGEST, reason).inc()


def observe_batcher(batcher: Batcher) -> None:
    """Each tick: write the hot path's counts, then the batcher's gauges."""
    flush()
    _observe_gauges(batcher)


def _observe_gauges(batcher: Batcher) -> None:
    """Set the open batches' gauges; called on each tick, after due batches left.

    Then the oldest open batch is younger than ``max_wait``, so ``next_due()`` gives its age
    exactly (an overdue one would read as ``max_wait``, a lower bound).
    """
    wait = batcher.next_due()
    metrics = _m()
    metrics.oldest_age.set(0.0 if wait is None else max(0.0, batcher.max_wait - wait))
    metrics.buffered.set(batcher.buffered)


# --- the pool processes -------------------------------------------------------------------------


def timed_post(client: Poster, events: Sequence[Any]) -> None:
    """``client.post(events)``, counted: status, events per request, seconds. Raises what it raises."""
    started = time.monotonic()
    status, outcome = "error", "error"  # unless it answered: a bug, an interruption
    try:
        client.post(events)
        status, outcome = "200", "success"
    except UploadError as exc:
        status = "error" if exc.status is None else str(exc.status)
        outcome = "transient" if isinstance(exc, Transient) else "permanent"
        raise
    finally:
        metrics = _m()
        metrics.uploads.labels(status, outcome).inc()
        metrics.batch_size.observe(len(events))
        metrics.duration.observe(time.monotonic() - started)


def batch_done(report: Report, published: Sequence[Outgoing], dead_letter_queue: str, *,
               first_attempt: bool) -> None:
    """Count one delivery attempt, once the broker confirmed ``published`` (its dead letters
    and retry message). Validity is counted on the first attempt only: retries re-validate."""
    metrics = _m()
    if first_attempt:
        metrics.valid.inc(report.received - report.invalid)
        metrics.stale.inc(report.stale)
    metrics.delivered.inc(report.delivered)
    dead = Tally(m.headers.get(deadletter.REASON_HEADER, "unknown") for m in published
                 if m.queue == dead_letter_queue)
    for reason, count in dead.items():
        metrics.dead.labels(DELIVERY, reason).inc(count)
        if (DELIVERY, reason) in INVALID_SERIES:
            metrics.invalid.labels(DELIVERY, reason).inc(count)
    metrics.retries.inc(len(published) - sum(dead.values()))
