"""What a worker process builds once: settings, queues, the circuit, uploads, publishers.

The composition root: the only module that knows every part. The consumer steps and the
upload task find the process's :class:`Runtime` with :func:`runtime_of`, given the app.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from config.settings import Settings
from worker.broker.background import BackgroundPublisher
from worker.broker.messages import Bundle, upload_message
from worker.broker.publisher import Outgoing, Publisher, PublisherPool
from worker.broker.topology import Topology
from worker.clock import Clock, SystemClock
from worker.events import jsonutil
from worker.gate import Gate
from worker.ops.metrics import CIRCUIT_STATES, Metrics, MetricsListener, watch
from worker.ops.sentry import LogListener
from worker.upload.circuit import Circuit
from worker.upload.client import ApiClient
from worker.upload.concurrency import AdaptiveConcurrency
from worker.upload.delivery import Delivery
from worker.upload.flow import TaskSizes
from worker.upload.hooks import Fanout
from worker.upload.retry import RetryPolicy
from worker.upload.seen import SeenTasks

#: Publishers shared by the upload threads (each a connection of its own).
PUBLISHERS = 4


@dataclass
class Runtime:
    """What one worker process needs to deliver bundles and to steer its consumers."""

    settings: Settings
    topology: Topology
    gate: Gate
    circuit: Circuit
    concurrency: AdaptiveConcurrency
    delivery: Delivery
    publishers: PublisherPool
    metrics: Metrics
    #: Every hook of the consumer, delivery, the circuit and the flow: metrics, logs, Sentry.
    listener: Fanout
    #: Outcomes the broker did not confirm, by task id: a redelivered task publishes them
    #: instead of uploading its events again.
    unpublished: dict[str, tuple[int, list[Outgoing]]] = field(default_factory=dict)
    #: The consumer's pipeline, once its step started (the quarantine step shares it).
    ingest: Any = None
    #: Tasks this process ran (or runs): a redelivery after a lost connection is not uploaded again.
    seen: SeenTasks = field(default_factory=SeenTasks)
    #: Events per upload task this process hands on (backpressure counts the upload queue in events).
    task_sizes: TaskSizes = field(default_factory=TaskSizes)
    #: The event loop's publisher (made on the loop's first need: :meth:`background`).
    _background: BackgroundPublisher | None = None

    def background(self, call_soon: Callable[[Callable[[], None]], Any]) -> BackgroundPublisher:
        """The publisher of the event loop's consumers (ingest, quarantine, salvage): a thread and a
        connection of its own, results back on the loop with ``call_soon`` (the worker's hub)."""
        if self._background is None:
            publisher = Publisher(self.settings.broker_url, declare=self.topology.publish_targets())
            self._background = BackgroundPublisher(publisher, call_soon=call_soon)
        return self._background

    def close_background(self) -> None:
        background, self._background = self._background, None
        if background is not None:
            background.close()

    def attempt_bound(self, bundle: Bundle) -> float:
        """The longest one upload attempt of ``bundle`` may take: a request per batch (bisection
        aside), each within UPLOAD_TIMEOUT (plus the connect timeout)."""
        per_request = self.settings.upload_timeout + self.settings.upload_connect_timeout
        return per_request * max(1, len(bundle.batches)) + 5.0

    def forward_to_ingest(self, event_or_list: Any) -> int:
        """Publish a Celery producer's events to the ``activities`` queue; return how many."""
        self.publishers.publish([Outgoing(self.settings.queue, jsonutil.dumps(event_or_list))])
        return len(event_or_list) if isinstance(event_or_list, list) else 1


def build_runtime(app: Celery, settings: Settings, *, clock: Clock | None = None,
                  metrics: Metrics | None = None) -> Runtime:
    """Wire a runtime from settings (tests call this with their own settings and clock)."""
    clock = clock or SystemClock()
    topology = Topology.of(settings)
    counted = metrics or Metrics()
    hooks = Fanout([MetricsListener(counted), LogListener()])
    circuit = Circuit(clock=clock, probe_base=max(settings.retry_backoff, 0.1), probe_max=settings.probe_interval_max,
                      listeners=[hooks])
    concurrency = AdaptiveConcurrency(ceiling=settings.upload_concurrency, clock=clock)
    publishers = PublisherPool(settings.broker_url, size=min(PUBLISHERS, settings.upload_concurrency),
                               declare=topology.publish_targets())
    gate = Gate()

    def retry_message(queue: str, bundle: Bundle) -> Outgoing:
        return upload_message(app, queue, bundle)

    delivery = Delivery(
        client=ApiClient(url=settings.upload_url, api_key=settings.api_key, timeout=settings.upload_timeout,
                         connect_timeout=settings.upload_connect_timeout),
        circuit=circuit,
        concurrency=concurrency,
        policy=RetryPolicy(max_retries=settings.max_retries, backoff=settings.retry_backoff,
                           backoff_max=settings.retry_backoff_max, window=settings.retry_window),
        topology=topology,
        publish=publishers.publish,
        retry_message=retry_message,
        clock=clock,
        max_bundle_events=settings.batch_size,
        max_bundle_bytes=settings.batch_max_bytes,
        naive_timestamps="reject" if settings.naive_timestamps == "reject" else "forward",
        listener=hooks,
    )
    watch(counted.in_flight, lambda: concurrency.in_flight)
    watch(counted.limit, lambda: concurrency.limit)
    watch(counted.circuit_state, lambda: CIRCUIT_STATES[circuit.state.value])
    watch(counted.ingest_paused, lambda: 0.0 if gate.is_open else 1.0)
    return Runtime(settings, topology, gate, circuit, concurrency, delivery, publishers, counted, hooks,
                   task_sizes=TaskSizes(initial=settings.batch_size))


_lock = threading.Lock()
_runtimes: dict[int, Runtime] = {}


def runtime_of(app: Celery) -> Runtime:
    """This process's runtime for ``app``, built on first use from the settings the app was
    configured with (read once, by :mod:`config.celeryconfig`)."""
    with _lock:
        runtime = _runtimes.get(id(app))
        if runtime is None:
            runtime = _runtimes[id(app)] = build_runtime(app, app.conf.netcore_settings)
        return runtime
