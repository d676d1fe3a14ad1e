"""The consumer bootstep: plugs :class:`~worker.ingest.Ingest` into the Celery worker.

It consumes the ``activities`` queue (plain JSON) and Celery's default queue (where
``send_task("activities.ingest", ...)`` lands) on a channel of its own, whose prefetch lets
the broker hand over enough unacknowledged messages to fill whole batches. A timer on the
worker's event loop releases batches that waited ``ACTIVITY_BATCH_WAIT``.

- Warm shutdown (SIGTERM): stop consuming, hand every open batch on, acknowledge, stop.
- Connection lost: forget what is in memory; the broker redelivers those messages.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu import Consumer, Exchange, Queue

from config.settings import Settings
from worker import metrics
from worker.acks import Acker
from worker.batching import Batch, Batcher
from worker.clock import SystemClock
from worker.errors import PublishError
from worker.ingest import Ingest
from worker.messages import upload_message
from worker.publisher import Publisher
from worker.runtime import queues, source_queue

logger = logging.getLogger(__name__)

#: How often the timer checks for batches that waited long enough, as a share of the wait.
TICKS_PER_WAIT = 10

#: The longest interval between two ticks, whatever the wait: stragglers are acknowledged
#: on ticks (worker.acks), and a long wait must not leave them unacknowledged for long.
MAX_TICK = 0.25


class IngestStep(bootsteps.ConsumerStep):
    """Consumes source messages into batches; see the module docstring."""

    name = "netcore.Ingest"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.settings = Settings.from_env()
        self.publisher = Publisher(self.settings.broker_url, declare=queues(self.settings))
        self.ingest: Ingest | None = None
        self._timer: Any = None

    def get_consumers(self, channel: Any) -> list[Consumer]:
        settings = self.settings
        # Bodies stay the bytes the producer sent: py-amqp would otherwise decode them with
        # whatever content_encoding the message claims, and dead letters would lose the original.
        channel.auto_decode = False
        app = self.consumer_app
        clock = SystemClock()
        batcher = Batcher(
            max_events=settings.batch_size,
            max_wait=settings.batch_wait,
            max_bytes=settings.batch_max_bytes,
            max_buffered=max(settings.batch_size, settings.prefetch - settings.batch_size),
            clock=clock,
        )

        def make_upload(batch: Batch) -> Any:
            return upload_message(app, settings.upload_queue, batch.asset_id, batch.events)

        self.ingest = Ingest(
            settings=settings,
            batcher=batcher,
            acker=Acker(channel.basic_ack),
            publish=self.publisher.publish,
            upload_message=make_upload,
            clock=clock,
            max_outstanding=max(1, settings.prefetch - settings.batch_size),
            release_slack=settings.prefetch // 20,
        )
        task_exchange = Exchange(settings.task_queue, "direct", durable=True)
        sources = [
            source_queue(settings),
            Queue(settings.task_queue, task_exchange, routing_key=settings.task_queue, durable=True),
        ]
        return [
            Consumer(channel, queues=sources, on_message=self.ingest.on_message,
                     prefetch_count=settings.prefetch, no_ack=False)
        ]

    def start(self, c: Any) -> None:
        self.consumer_app = c.app
        super().start(c)
        interval = min(MAX_TICK, max(0.01, self.settings.batch_wait / TICKS_PER_WAIT))
        self._timer = c.timer.call_repeatedly(interval, self._tick)
        logger.info(
            "Consuming %s and %s from %s (prefetch %d, batches of %d, wait %.2f s) -> %s",
            self.settings.queue, self.settings.task_queue, self.settings.broker_url_redacted,
            self.settings.prefetch, self.settings.batch_size, self.settings.batch_wait, self.settings.upload_url,
        )

    def stop(self, c: Any) -> None:
        self._wind_down(c)
        super().stop(c)

    def shutdown(self, c: Any) -> None:
        self._wind_down(c)
        super().shutdown(c)
        self.publisher.close()

    def _tick(self) -> None:
        if self.ingest is not None:
            self.ingest.tick()
            metrics.observe_batcher(self.ingest.batcher)

    def _wind_down(self, c: Any) -> None:
        """Flush on a warm shutdown; forget on a lost connection."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ingest, self.ingest = self.ingest, None
        if ingest is None:
            return
        for consumer in self.consumers or []:
            try:
                consumer.cancel()
            except Exception:  # the channel is already gone
                pass
        if c.connection is None:
            logger.warning("Connection lost: %d buffered events will be redelivered", ingest.discard())
            return
        try:
            buffered = ingest.batcher.buffered
            ingest.flush_all()
            logger.info("Shutdown: handed on %d buffered events", buffered)
        except (PublishError, OSError) as exc:
            logger.warning("Shutdown: could not flush (%s); %d events will be redelivered", exc, ingest.discard())
