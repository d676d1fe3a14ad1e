"""The worker's consumer: Celery's, made to ride out a network partition, and without the native
delayed delivery step.

**A network partition** (the broker's host unreachable for a while, then back) leaves the two
sides at odds. This side notices within seconds: py-amqp's sockets have a ``TCP_USER_TIMEOUT``
of 1 s, so a connection whose acks or heartbeats go unanswered is aborted by the kernel, and the
consumer reconnects as soon as the network is back. RabbitMQ notices only when its heartbeat
timeout passes (or when it next sends, if that comes first): until then it holds the old
connection, its unacknowledged messages and its exclusive queues. One of those is Celery's
remote-control queue (``<hostname>.celery.pidbox``, exclusive to the connection that declared it):
Celery declares it again at each reconnection, the broker answers ``RESOURCE_LOCKED``, and
Celery's consumer ends the worker ("Unrecoverable error"): under a process manager, a restart
loop until the broker lets go. Heartbeats of 120 s (Celery's default) made that up to six minutes.

What is changed, and why this and not something else:

- :class:`Control` starts remote control later when its queue is still held: the consumer runs
  (events are consumed, batched and uploaded at once), and the event loop tries to take the queue
  back every :data:`PIDBOX_RETRY_INTERVAL` seconds until the broker has let the old connection
  go (a queue held by a live connection, a second worker of the same name, is waited for as long,
  the warning says so). Only ``RESOURCE_LOCKED`` is waited out; any other error is Celery's to
  handle, as before.
  Celery's own answer, ``broker_channel_error_retry``, restarts the whole consumer on *every*
  channel error while it starts: it reconnects several times a second for the whole wait
  (measured: 154 reconnections and 25 "Frequent restarts detected" errors in 28 s), consuming
  nothing meanwhile, and it would make a real misconfiguration, such as a queue declared with
  other arguments, retry for ever instead of stopping. A non-exclusive remote-control queue
  (``control_queue_exclusive = False``) avoids the lock, but RabbitMQ deprecates transient
  non-exclusive queues and refuses them by default since 4.3; a durable one
  (``control_queue_durable``) lives on one node of a cluster and cannot be declared while that
  node is down, the very time the worker reconnects to another.
- :class:`Heart` sends its ``worker-heartbeat`` events without retrying. Celery's retries for
  ever, reconnecting in the event loop: during a partition the whole loop stopped there (no
  consuming, no heartbeats, the lost consumer connection not even noticed) until the network was
  back. Without the retry a heartbeat event sent on a dead connection is kept for later, and the
  dead connection is found by the AMQP heartbeats that the loop checks on it, which restart the
  consumer as any lost connection does.
- The AMQP heartbeats themselves are short (``broker_heartbeat`` in :mod:`config.celeryconfig`),
  so that the broker lets an old connection go within tens of seconds.

Celery (5.5+) also adds a ``DelayedDelivery`` step to every consumer whose queues include a
quorum queue: at each start, and again after each reconnection, it declares 28
``celery_delayed_*`` quorum queues and three exchanges on *every* broker URL of the failover
list, retrying each unreachable one for about 10 s (measured: 15 s without consuming after a
cluster node died). This worker never uses ETA or countdown tasks, its retries wait in its own
delay queues (:mod:`worker.broker.topology`), so that step is left out. Loaded by name:
``worker_consumer`` in :mod:`config.celeryconfig`.

**What it cannot take** is set aside, never deleted, never logged. Celery's own handling of a
task message it cannot take (no task headers, a task it does not know, arguments it cannot read,
a body it cannot decode) logs the message's body, which holds events and so personal data, and in
two of the four cases acknowledges, deleting it. Here each rejects the message without requeue,
down its queue's dead-letter route to the salvage (:mod:`worker.deadletter.salvage`), which keeps
it whole, and logs one line without the body. These are class methods, so they hold from the
first connection on (Celery binds ``on_decode_error`` when its task consumer is made).
"""

from __future__ import annotations

import logging
from typing import Any

from amqp.exceptions import ResourceLocked
from celery.worker import heartbeat, pidbox
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.control import Control as CeleryControl
from celery.worker.consumer.heart import Heart as CeleryHeart

from worker.upload.step import set_aside

logger = logging.getLogger(__name__)

#: The step left out of Celery's consumer blueprint.
LEFT_OUT = "celery.worker.consumer.delayed_delivery:DelayedDelivery"

#: Celery's steps replaced, each by the step of this module that takes its place.
REPLACED = {
    "celery.worker.consumer.control:Control": "worker.consumer:Control",
    "celery.worker.consumer.heart:Heart": "worker.consumer:Heart",
}

#: Seconds between two attempts to take the remote-control queue back from an old connection.
PIDBOX_RETRY_INTERVAL = 2.0


class Pidbox(pidbox.Pidbox):  # type: ignore[misc]  # Celery ships no type information
    """Celery's remote-control mailbox, started again later while the broker holds its queue."""

    def __init__(self, c: Any) -> None:
        super().__init__(c)
        #: The timer entry of the next attempt, while one is due.
        self.retry: Any = None
        #: How many attempts in a row found the queue held.
        self.held = 0

    def start(self, c: Any) -> None:
        try:
            super().start(c)
        except ResourceLocked as exc:
            self._close_channel(c)
            self._retry_later(c, exc)
            return
        if self.held:
            logger.info("Remote control listens again, %d attempts later", self.held + 1)
            self.held = 0

    def _retry_later(self, c: Any, exc: ResourceLocked) -> None:
        if not self.held:
            logger.warning("Remote control waits: the broker holds its queue for another connection, an old one "
                           "of this worker until the broker's heartbeat timeout lets it go, or a worker of the "
                           "same name (%s); trying again every %.0f s", exc, PIDBOX_RETRY_INTERVAL)
        self.held += 1
        self.retry = c.timer.call_after(PIDBOX_RETRY_INTERVAL, self._retry, (c, c.connection))

    def _retry(self, c: Any, connection: Any) -> None:
        self.retry = None
        if c.connection is connection:  # otherwise the consumer has reconnected and started again
            self.start(c)

    def stop(self, c: Any) -> None:
        if self.retry is not None:
            c.timer.cancel(self.retry)
            self.retry = None
        super().stop(c)


class Control(CeleryControl):  # type: ignore[misc]
    """Celery's remote-control step with :class:`Pidbox` (this worker's pool is a thread pool,
    never a green one)."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)  # makes Celery's mailbox, replaced here: nothing started yet
        self.box = Pidbox(c)
        self.start, self.stop, self.shutdown = self.box.start, self.box.stop, self.box.shutdown


class NoRetryHeart(heartbeat.Heart):  # type: ignore[misc]
    """Celery's event heartbeat, whose events are sent once: never a reconnection in the loop."""

    def _send(self, event: str, retry: bool = False) -> Any:
        return super()._send(event, retry=False)


class Heart(CeleryHeart):  # type: ignore[misc]
    """Celery's event-heartbeat step with :class:`NoRetryHeart`."""

    def start(self, c: Any) -> None:
        c.heart = NoRetryHeart(c.timer, c.event_dispatcher, self.heartbeat_interval)
        c.heart.start()


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with its default steps but :data:`LEFT_OUT`, and :data:`REPLACED`."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc]  # the same: Any to mypy
        default_steps = [REPLACED.get(step, step) for step in CeleryConsumer.Blueprint.default_steps
                         if step != LEFT_OUT]

    def on_unknown_message(self, body: Any, message: Any) -> None:
        set_aside(message, "a message without task headers")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a task message for {str((message.headers or {}).get('task'))[:100]!r}, which this "
                           "worker does not run")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a task message that is not valid ({type(exc).__name__})")

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        set_aside(message, f"a message that could not be decoded ({type(exc).__name__})")
