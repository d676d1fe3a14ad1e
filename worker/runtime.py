"""What a worker process builds once: settings, queues, a lane per account, publishers, metrics.

The composition root: the only module that knows every part. The consumer steps and the
upload task find the process's :class:`Runtime` with :func:`runtime_of`, given the app.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from config.settings import Settings
from worker.broker.background import BackgroundPublisher
from worker.broker.messages import Bundle, upload_message
from worker.broker.publisher import Outgoing, Publisher, PublisherPool
from worker.broker.topology import Topology
from worker.clock import Clock, SystemClock
from worker.deadletter import envelopes, salvage
from worker.events import jsonutil
from worker.ops.metrics import Metrics, MetricsListener, watch_lanes
from worker.ops.sentry import LogListener
from worker.upload.hooks import Fanout
from worker.upload.lanes import Lane, Lanes, build_lanes
from worker.upload.seen import SeenTasks
from worker.upload.task import OUTCOME_BACKOFF

#: Publishers shared by the upload threads (each a connection of its own).
PUBLISHERS = 4


@dataclass
class Runtime:
    """What one worker process needs to deliver bundles and to steer its consumers."""

    settings: Settings
    topology: Topology
    #: One lane per Netcore account: its client, circuit, adaptive limit, delivery and queue.
    lanes: Lanes
    publishers: PublisherPool
    metrics: Metrics
    #: Every hook of the consumer, delivery, the circuits and the flow: metrics, logs, Sentry.
    listener: Fanout
    #: Outcomes the broker did not confirm, by task id: a redelivered task publishes them
    #: instead of uploading its events again (and the salvage writes them, if it comes to that).
    unpublished: dict[str, tuple[int, list[Outgoing]]] = field(default_factory=dict)
    #: The consumer's pipeline, once its step started (the quarantine step shares it).
    ingest: Any = None
    #: The flow that steers each account's upload consumer, once its step started.
    flow: Any = None
    #: Tasks this process ran (or runs): a redelivery after a lost connection is not uploaded again.
    seen: SeenTasks = field(default_factory=SeenTasks)
    #: Seconds between the tries to publish an outcome the broker did not confirm.
    outcome_backoff: Sequence[float] = OUTCOME_BACKOFF
    #: The event loop's publisher (made on the loop's first need: :meth:`background`).
    _background: BackgroundPublisher | None = None

    def lane_of(self, bundle: Bundle) -> Lane:
        """The lane of the account a bundle names (an older worker's bundle: of its asset_ids).
        Raises ValueError for an account this worker does not know: the task is rejected and
        the salvage keeps its events."""
        name = bundle.account
        if name is None and bundle.batches:
            account = self.settings.accounts.route(bundle.batches[0].asset_id)
            name = account.name if account is not None else None
        lane = self.lanes.get(name) if name is not None else None
        if lane is None:
            raise ValueError(f"no account {name!r} is configured for this upload task (its asset_ids: "
                             f"{[b.asset_id for b in bundle.batches][:3]})")
        return lane

    def attempt_bound(self, bundle: Bundle) -> float:
        """The longest one upload attempt of ``bundle`` may take: a request per batch (bisection
        aside), each within UPLOAD_TIMEOUT (plus the connect timeout)."""
        per_request = self.settings.upload_timeout + self.settings.upload_connect_timeout
        return per_request * max(1, len(bundle.batches)) + 5.0

    def forward_to_ingest(self, event_or_list: Any) -> int:
        """Publish a Celery producer's events to the ``activities`` queue; return how many."""
        self.publishers.publish([Outgoing(self.settings.queue, jsonutil.dumps(event_or_list))])
        return len(event_or_list) if isinstance(event_or_list, list) else 1

    def outcome_as_dead_letters(self, messages: Sequence[Outgoing], *, error: str) -> list[Outgoing]:
        """An outcome whose retries the broker would not take, as dead letters: its dead letters
        as they are, each event of its retries as an ``unhandled`` envelope (replayable)."""
        letters = envelopes.DeadLetters(queue=self.topology.dead_letter, clock=SystemClock())
        why = (f"The broker would not take this event's retry ({error}), again and again; the worker set it aside "
               "here instead, whole. It was not delivered: replay it once the broker is healthy.")
        out: list[Outgoing] = []
        for message in messages:
            if message.queue == self.topology.dead_letter:
                out.append(message)
            else:
                out += salvage.dead_letters(message.body, dict(message.headers), letters, why=why)
        return out

    def kept_outcome(self, task_id: str) -> list[Outgoing] | None:
        """The dead letters of an outcome this process could not publish (for the salvage)."""
        kept = self.unpublished.pop(task_id, None)
        return None if kept is None else self.outcome_as_dead_letters(kept[1], error="set aside")

    def background(self, call_soon: Callable[[Callable[[], None]], Any]) -> BackgroundPublisher:
        """The publisher of the event loop's consumers (ingest, quarantine, salvage): a thread and a
        connection of its own, results back on the loop with ``call_soon`` (the worker's hub)."""
        if self._background is None:
            publisher = Publisher(self.settings.broker_url, declare=self.topology.publish_targets(),
                                  ssl=self.settings.broker_ssl())
            self._background = BackgroundPublisher(publisher, call_soon=call_soon)
        return self._background

    def close_background(self) -> None:
        background, self._background = self._background, None
        if background is not None:
            background.close()


def build_runtime(app: Celery, settings: Settings, *, clock: Clock | None = None,
                  metrics: Metrics | None = None) -> Runtime:
    """Wire a runtime from settings (tests call this with their own settings and clock)."""
    clock = clock or SystemClock()
    topology = Topology.of(settings)
    counted = metrics or Metrics()
    hooks = Fanout([MetricsListener(counted), LogListener()])
    publishers = PublisherPool(settings.broker_url, size=min(PUBLISHERS, settings.upload_concurrency),
                               declare=topology.publish_targets(), ssl=settings.broker_ssl())

    def retry_message(queue: str, bundle: Bundle) -> Outgoing:
        return upload_message(app, queue, bundle)

    lanes = build_lanes(settings, topology, clock=clock, publish=publishers.publish, retry_message=retry_message,
                        listener=hooks)
    watch_lanes(counted, lanes)
    return Runtime(settings, topology, lanes, publishers, counted, hooks)


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
