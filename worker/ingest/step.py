"""The consumer bootstep: plugs :class:`~worker.ingest.Ingest` into the Celery worker.

It consumes the ``activities`` queue (plain JSON) and Celery's default queue (where
``send_task("activities.ingest", ...)`` lands) on a channel of its own, whose prefetch lets
the broker hand over enough unacknowledged messages to fill whole batches. A timer on the
worker's event loop releases batches that waited ``ACTIVITY_BATCH_WAIT``, and follows the
gate (:mod:`worker.gate`): while the upload side says so (the API is down, or upload tasks
pile up), it stops taking messages; what it holds still leaves within ``ACTIVITY_BATCH_WAIT``,
or, while uploads are behind, keeps filling for at most ``HOLD_WAITS`` times that.

- Start: every queue of the worker is declared, so tools and monitors find them all at once.
- Warm shutdown (SIGTERM): stop consuming, hand every open batch on, acknowledge, stop.
- Connection lost: forget what is in memory; the broker redelivers those messages.

The consumers have a connection of their own, on the worker's event loop (see :meth:`IngestStep.start`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.connection import Connection
from kombu.messaging import Consumer

from worker.broker.messages import Bundle, batches_per_bundle, upload_message
from worker.broker.publisher import Outgoing, Publisher
from worker.broker.topology import declare
from worker.clock import SystemClock
from worker.errors import PublishError
from worker.ingest.acks import Acker
from worker.ingest.batching import Batcher
from worker.ingest.pipeline import CONNECTION_ERRORS, Ingest

logger = logging.getLogger(__name__)

#: How often the timer checks for batches that waited long enough, as a share of the wait.
TICKS_PER_WAIT = 10

#: What a flush on shutdown may meet: the broker does not confirm, or a connection is gone.
FLUSH_ERRORS: tuple[type[BaseException], ...] = (PublishError, *CONNECTION_ERRORS)

#: The longest a batch waits in all, in ``ACTIVITY_BATCH_WAIT``\ s, when uploads are behind and
#: it is held to fill (:meth:`~worker.ingest.batching.Batcher.hold`): 10 s by default.
HOLD_WAITS = 5

#: The longest interval between two ticks, whatever the wait: stragglers are acknowledged
#: on ticks (worker.ingest.acks), and a long wait must not leave them unacknowledged for long.
MAX_TICK = 0.25


class IngestStep(bootsteps.ConsumerStep):
    """Consumes source messages into batches; see the module docstring."""

    name = "netcore.Ingest"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime = c.app.runtime()
        self.settings = self.runtime.settings
        self.topology = self.runtime.topology
        self.publisher = Publisher(self.settings.broker_url, declare=self.topology.publish_targets())
        self.ingest: Ingest | None = None
        self.connection: Connection | None = None
        self._hub: Any = None
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
            max_hold=HOLD_WAITS * settings.batch_wait,
        )

        def make_upload(bundle: Bundle) -> Outgoing:
            return upload_message(app, topology.upload, bundle)

        self.ingest = Ingest(
            settings=settings,
            batcher=batcher,
            acker=Acker(channel.basic_ack),
            publish=self.publisher.publish,
            upload_message=make_upload,
            clock=clock,
            max_outstanding=max(1, settings.prefetch - settings.batch_size),
            release_slack=settings.prefetch // 20,
            quarantine_queue=topology.quarantine,
            listener=self.runtime.listener,
            bundle_batches=lambda: batches_per_bundle(self.runtime.concurrency.round_trip),
        )
        self.runtime.ingest = self.ingest  # the quarantine step hands its messages to the same pipeline
        self._consuming = False  # until the first tick: see start()
        return [
            Consumer(channel, queues=[topology.source_queue(), topology.task_source_queue()],
                     on_message=self.ingest.on_message, prefetch_count=settings.prefetch, no_ack=False)
        ]

    def start(self, c: Any) -> None:
        """As :meth:`ConsumerStep.start`, with two differences.

        The consumers have a connection of their own, on the same event loop: thousands of
        source messages in flight (the prefetch) would otherwise stand, on the one socket,
        between RabbitMQ and every upload task and acknowledgement of the upload side, and
        hold each of them back by up to a second.

        They consume from the first tick on, once the event loop runs: started here, thousands
        of messages would be handled inside the synchronous broker calls of the steps that start
        after this one, delaying the worker's start, and its first uploads, by seconds.
        """
        self.consumer_app = c.app
        self.connection = c.connection.clone()
        self.connection.connect()
        self.connection.transport.register_with_event_loop(self.connection.connection, c.hub)
        self._hub = c.hub
        self.consumers = self.get_consumers(self.connection.channel())
        interval = min(MAX_TICK, max(0.01, self.settings.batch_wait / TICKS_PER_WAIT))
        self._timer = c.timer.call_repeatedly(interval, self._tick)
        logger.info(
            "Consuming %s and %s from %s (prefetch %d, batches of %d, wait %.2f s) -> %s",
            self.settings.queue, self.settings.task_queue, self.settings.broker_url_redacted,
            self.settings.prefetch, self.settings.batch_size, self.settings.batch_wait, self.settings.upload_url,
        )

    def stop(self, c: Any) -> None:
        self._wind_down(c)
        self._close()

    def shutdown(self, c: Any) -> None:
        self._wind_down(c)
        self._close()
        self.publisher.close()

    def _close(self) -> None:
        """Leave the event loop and close the connection: what is still unacknowledged on it
        goes back to its queue."""
        connection, self.connection = self.connection, None
        self.consumers = []
        if connection is None:
            return
        sock = getattr(connection.connection, "sock", None) if connection.connected else None
        if self._hub is not None and sock is not None:
            self._hub.remove(sock)
        try:
            connection.release()
        except Exception:  # already broken: the broker requeues either way
            pass

    def _tick(self) -> None:
        if self.connection is not None:
            self.connection.heartbeat_check()  # the broker's heartbeats, as Celery does for its own connection
        if self.ingest is not None:
            self.ingest.tick()
            self._follow_gate()
            self.runtime.listener.observe_batcher(self.ingest.batcher)

    def _follow_gate(self) -> None:
        """Stop or resume taking messages as the gate says, and while a hand-off waits for the
        broker (a basic.cancel / basic.consume)."""
        gate = self.runtime.gate
        wanted = gate.is_open and not (self.ingest is not None and self.ingest.blocked)
        if self.ingest is not None:
            self.ingest.batcher.hold(gate.behind)
        if wanted == self._consuming:
            return
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
        if c.connection is None or self.connection is None or not self.connection.connected:
            logger.warning("Connection lost: %d buffered events will be redelivered", ingest.discard())
            return
        try:
            buffered = ingest.batcher.buffered
            ingest.flush_all()
            logger.info("Shutdown: handed on %d buffered events", buffered)
        except FLUSH_ERRORS as exc:
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
                         prefetch_count=1, no_ack=False)]

    def _on_message(self, message: Any) -> None:
        ingest = self.runtime.ingest
        if ingest is None:  # the consumer is restarting: the message comes back
            message.reject(requeue=True)
            return
        ingest.handle_alone(message, message.ack)
