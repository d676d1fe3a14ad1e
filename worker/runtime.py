"""The objects each worker process builds once: settings, publisher, API client, delivery.

Pool processes are forked from the main process; sockets must not be shared across a fork,
so :func:`process_runtime` builds a fresh set per process id, on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import Queue

from config.settings import Settings
from worker import jsonutil
from worker.client import ApiClient
from worker.clock import Clock, SystemClock
from worker.delivery import Delivery
from worker.messages import upload_message
from worker.publisher import Outgoing, Publisher
from worker.retry import RetryPolicy


def source_queue(settings: Settings) -> Queue:
    """The ``activities`` queue, as every part of the project declares it (arguments must match)."""
    arguments = {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else None
    return Queue(settings.queue, durable=True, queue_arguments=arguments)


def queues(settings: Settings) -> list[Queue]:
    """Every queue the worker publishes to, durable, declared before first use."""
    return [
        source_queue(settings),
        Queue(settings.dead_letter_queue, durable=True),
        Queue(settings.upload_queue, durable=True),
    ]


@dataclass
class Runtime:
    """What one process needs to deliver batches."""

    settings: Settings
    publisher: Publisher
    delivery: Delivery

    def forward_to_ingest(self, event_or_list: Any) -> int:
        """Publish a Celery producer's events to the ``activities`` queue; return how many."""
        self.publisher.publish([Outgoing(self.settings.queue, jsonutil.dumps(event_or_list))])
        return len(event_or_list) if isinstance(event_or_list, list) else 1


_runtime: tuple[int, Runtime] | None = None


def build_runtime(app: Celery, settings: Settings, clock: Clock | None = None) -> Runtime:
    """Wire a runtime from settings (tests call this with their own settings)."""
    clock = clock or SystemClock()
    publisher = Publisher(settings.broker_url, declare=queues(settings))
    client = ApiClient(
        url=settings.upload_url,
        api_key=settings.api_key,
        timeout=settings.upload_timeout,
        connect_timeout=settings.upload_connect_timeout,
    )
    policy = RetryPolicy(
        max_retries=settings.max_retries, backoff=settings.retry_backoff, backoff_max=settings.retry_backoff_max
    )

    def retry_message(asset_id: str, events: list[Any], attempts: int, countdown: float) -> Outgoing:
        return upload_message(app, settings.upload_queue, asset_id, events, attempts, countdown)

    delivery = Delivery(
        client=client,
        policy=policy,
        publish=publisher.publish,
        retry_message=retry_message,
        dead_letter_queue=settings.dead_letter_queue,
        clock=clock,
        naive_timestamps=settings.naive_timestamps,  # type: ignore[arg-type]  # checked by settings
    )
    return Runtime(settings, publisher, delivery)


def process_runtime(app: Celery) -> Runtime:
    """This process's runtime, built on first use after a fork."""
    global _runtime
    pid = os.getpid()
    if _runtime is None or _runtime[0] != pid:
        _runtime = (pid, build_runtime(app, Settings.from_env()))
    return _runtime[1]
