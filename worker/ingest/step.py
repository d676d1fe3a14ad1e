"""The consumer bootstep: plugs :class:`~worker.ingest.Ingest` into the Celery worker.

It consumes the ``activities`` queue (plain JSON) and Celery's default queue (where
``send_task("activities.ingest", ...)`` lands) on a channel of its own, whose prefetch lets
the broker hand over enough unacknowledged messages to fill whole batches. A timer on the
worker's event loop releases the open batches once the oldest waited ``ACTIVITY_BATCH_WAIT``.
The consumer stops taking messages only while its hand-offs wait for the broker; nothing about
the API stops it (:mod:`worker.upload.flow` says who stops whom): each batch goes to the upload
queue of its asset_id's account, where it waits if that account's API is down.

Hand-offs are published by the runtime's background publisher (:mod:`worker.broker.background`):
nothing here waits for the broker. A delivery kombu cannot decode reaches the pipeline all the
same (``on_decode_error``), so that every delivery tag passes through it (the ack invariant,
:mod:`worker.ingest.pipeline`).

- Start: every queue of the worker is declared, so tools and monitors find them all at once.
- Warm shutdown (SIGTERM): stop consuming, hand every open batch on, wait for the broker's
  confirms (:data:`FLUSH_TIMEOUT` at most), acknowledge, stop.
- Connection lost: forget what is in memory; the broker redelivers those messages.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer

from config.accounts import DEFAULT
from worker.broker.messages import Bundle, batches_per_bundle, upload_message
from worker.broker.publisher import Outgoing
from worker.broker.topology import declare
from worker.clock import SystemClock
from worker.errors import PublishError
from worker.ingest.acks import Acker
from worker.ingest.batching import Batcher
from worker.ingest.pipeline import Ingest

logger = logging.getLogger(__name__)

#: How often the timer checks for batches that waited long enough, as a share of the wait.
TICKS_PER_WAIT = 10

#: The longest interval between two ticks, whatever the wait: stragglers are acknowledged
#: on ticks (worker.ingest.acks), and a long wait must not leave them unacknowledged for long.
MAX_TICK = 0.25

#: Seconds a warm shutdown waits for the broker to confirm the last hand-offs.
FLUSH_TIMEOUT = 30.0


class IngestStep(bootsteps.ConsumerStep):
    """Consumes source messages into batches; see the module docstring."""

    name = "netcore.Ingest"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime = c.app.runtime()
        self.settings = self.runtime.settings
        self.topology = self.runtime.topology
        self.ingest: Ingest | None = None
        self._timer: Any = None
        self._consuming = False

    def get_consumers(self, channel: Any) -> list[Consumer]:
        settings, topology = self.settings, self.topology
        # Bodies stay the bytes the producer sent: py-amqp would otherwise decode them with
        # whatever content_encoding the message claims, and dead letters would lose the original.
        channel.auto_decode = False
        declare(channel, topology.all_queues())
        app = self.consumer_app
        clock = SystemClock()
        batcher = Batcher(
            max_events=settings.batch_size,
            max_wait=settings.batch_wait,
            max_bytes=settings.batch_max_bytes,
            max_buffered=max(settings.batch_size, settings.prefetch - settings.batch_size),
            clock=clock,
        )

        def make_upload(bundle: Bundle) -> Outgoing:
            return upload_message(app, topology.upload_for(bundle.account or DEFAULT), bundle)

        def bundle_batches(account: str) -> int:
            lane = self.runtime.lanes.get(account)
            return batches_per_bundle(lane.concurrency.round_trip if lane is not None else None)

        self.ingest = Ingest(
            settings=settings,
            batcher=batcher,
            acker=Acker(channel.basic_ack),
            publisher=self.runtime.background(self.call_soon),
            upload_message=make_upload,
            clock=clock,
            max_outstanding=max(1, settings.prefetch - settings.batch_size),
            release_slack=settings.prefetch // 20,
            quarantine_queue=topology.quarantine,
            listener=self.runtime.listener,
            bundle_batches=bundle_batches,
        )
        self.runtime.ingest = self.ingest  # the quarantine step hands its messages to the same pipeline
        self._consuming = True
        return [
            Consumer(channel, queues=[topology.source_queue(), topology.task_source_queue()],
                     on_message=self.ingest.on_message, on_decode_error=self.ingest.on_undecodable,
                     prefetch_count=settings.prefetch, no_ack=False)
        ]

    def start(self, c: Any) -> None:
        self.consumer_app = c.app
        self.call_soon = c.hub.call_soon
        channel = c.connection.channel()
        self.consumers = consumers = self.get_consumers(channel)
        # Messages are taken once the event loop runs, not during the start-up steps that follow
        # (their broker calls would deliver the backlog into a pipeline whose hand-offs cannot
        # report back before the loop runs: thousands of messages held, batches cut small).
        c.hub.call_soon(self._begin, consumers)
        interval = min(MAX_TICK, max(0.01, self.settings.batch_wait / TICKS_PER_WAIT))
        self._timer = c.timer.call_repeatedly(interval, self._tick)
        logger.info(
            "Consuming %s and %s from %s (prefetch %d, batches of %d, wait %.2f s) -> accounts %s",
            self.settings.queue, self.settings.task_queue, self.settings.broker_url_redacted,
            self.settings.prefetch, self.settings.batch_size, self.settings.batch_wait,
            ", ".join(f"{a.name} ({a.where})" for a in self.settings.accounts),
        )

    def _begin(self, consumers: list[Consumer]) -> None:
        """The event loop's first turn: start taking messages (unless stopped meanwhile)."""
        if self.ingest is None or self.consumers is not consumers or not self._consuming:
            return
        for consumer in consumers:
            consumer.consume()

    def stop(self, c: Any) -> None:
        self._wind_down(c)
        super().stop(c)

    def shutdown(self, c: Any) -> None:
        self._wind_down(c)
        super().shutdown(c)
        self.runtime.close_background()  # the last step that publishes through it (steps stop in reverse)

    def _tick(self) -> None:
        if self.ingest is not None:
            self.ingest.tick()
            self._follow_broker()
            self.runtime.listener.observe_batcher(self.ingest.batcher)

    def _follow_broker(self) -> None:
        """Stop taking messages while a hand-off waits to be tried again, resume after (a
        basic.cancel / basic.consume)."""
        wanted = not (self.ingest is not None and self.ingest.blocked)
        if wanted == self._consuming:
            return
        self.runtime.metrics.ingest_paused.set(0.0 if wanted else 1.0)
        logger.warning("Consumer %s", "resumed: the broker confirms again" if wanted else
                       "paused: the broker does not confirm its hand-offs (events wait in RabbitMQ)")
        for consumer in self.consumers or []:
            if wanted:
                consumer.consume()
            else:
                consumer.cancel()
        self._consuming = wanted

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
            ingest.flush_all(FLUSH_TIMEOUT)
            logger.info("Shutdown: handed on %d buffered events", buffered)
        except (PublishError, OSError) as exc:
            logger.warning("Shutdown: could not flush (%s); %d events will be redelivered", exc, ingest.discard())


class QuarantineStep(bootsteps.ConsumerStep):
    """Consumes the quarantine queue one message at a time, on a channel of its own, handing each
    to :meth:`~worker.ingest.Ingest.handle_alone` (see :mod:`worker.ingest.pipeline`)."""

    name = "netcore.Quarantine"
    requires = (IngestStep,)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime = c.app.runtime()

    def get_consumers(self, channel: Any) -> list[Consumer]:
        channel.auto_decode = False
        return [Consumer(channel, queues=[self.runtime.topology.quarantine_queue()], on_message=self._on_message,
                         on_decode_error=self._on_undecodable, prefetch_count=1, no_ack=False)]

    def _on_message(self, message: Any) -> None:
        ingest = self.runtime.ingest
        if ingest is None:  # the consumer is restarting: the message comes back
            message.reject(requeue=True)
            return
        ingest.handle_alone(message, message.ack)

    def _on_undecodable(self, message: Any, exc: Exception) -> None:
        ingest = self.runtime.ingest
        if ingest is None:
            message.reject(requeue=True)
            return
        ingest.undecodable_alone(message, exc, message.ack)
