"""The upload side as a consumer bootstep: one consumer per account's upload queue, steered by the flow.

Celery consumes its task queues with one consumer and one prefetch; here each account has a
consumer on a channel of its own (its prefetch is its adaptive limit, :mod:`worker.upload.flow`),
whose messages go through Celery's own task handler, so that they are requests like any other:
run on the pool, acknowledged late, reported to Flower. Celery's task consumer is left consuming
nothing.

**The ack invariant, upload side.** Every delivery of an upload queue ends in Celery's task
handler, which takes it as a request or sets it aside (:mod:`worker.consumer`), or in
:func:`reject` (kombu could not decode it, or the handler raised before Celery took it: a header
no task message has): rejected without requeue, it goes down the queue's dead-letter route to the
salvage (:mod:`worker.deadletter.salvage`), which keeps it whole.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from kombu.messaging import Consumer

from worker.broker.connection import CONNECTION_ERRORS
from worker.broker.watch import QueueWatcher
from worker.clock import SystemClock
from worker.upload.flow import TICK, LaneConsumer, UploadConsumer, UploadFlow
from worker.upload.lanes import Lane

logger = logging.getLogger(__name__)


def set_aside(message: Any, what: str) -> None:
    """Reject ``message`` down its queue's dead-letter route, saying what it was, never its body."""
    logger.error("Setting aside %s from %s: rejected to its dead-letter route, where the salvage keeps it whole",
                 what, (message.delivery_info or {}).get("routing_key"))
    if not message.acknowledged:
        message.reject(requeue=False)


def reject(message: Any, exc: BaseException) -> None:
    """Set a delivery this worker cannot take aside, down its queue's dead-letter route."""
    set_aside(message, f"an upload task message it could not handle ({type(exc).__name__})")


def guarded(handler: Any) -> Any:
    """Celery's task handler, with anything it raises turned into :func:`reject`."""

    def on_message(message: Any) -> None:
        try:
            handler(message)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            reject(message, exc)

    return on_message


class UploadStep(bootsteps.StartStopStep):
    """See the module docstring."""

    name = "netcore.Uploads"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer: Any = None
        self.flow: UploadFlow | None = None
        self._consumers: list[LaneConsumer] = []
        self._watcher: QueueWatcher | None = None

    def start(self, c: Any) -> None:
        runtime = c.app.runtime()
        for queue in list(c.task_consumer.queues):  # each account's queue has a consumer of its own
            c.task_consumer.cancel_by_queue(queue.name)
        handler = guarded(c.create_task_handler())
        steered: list[tuple[Lane, UploadConsumer]] = []
        self._consumers = []
        for lane in runtime.lanes:
            channel = c.connection.channel()
            consumer = Consumer(channel, queues=[runtime.topology.upload_queue(lane.name)], on_message=handler,
                                on_decode_error=reject, no_ack=False, auto_declare=True)
            self._consumers.append(LaneConsumer(consumer, quorum=runtime.topology.quorum, clock=SystemClock()))
            steered.append((lane, self._consumers[-1]))
        self.flow = runtime.flow = UploadFlow(steered)
        # the first tick comes from the timer, inside the event loop: only then do the consumers start
        self._timer = c.timer.call_repeatedly(TICK, self.flow.tick)
        if self._watcher is None:
            self._watcher = _watch_queues(runtime).start()

    def stop(self, c: Any) -> None:
        """Stop taking tasks; the channels stay open, so that the tasks still running (a warm
        shutdown waits for them) can be acknowledged on them."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for consumer in self._consumers:
            try:
                consumer.pause()
            except Exception:  # the connection is gone already
                pass

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        for consumer in self._consumers:
            try:
                consumer.channel.close()
            except Exception:  # the connection is gone already
                pass
        self._consumers = []
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None


def _watch_queues(runtime: Any) -> QueueWatcher:
    """The metrics' readings of each account's upload and delay queues."""
    topology, metrics = runtime.topology, runtime.metrics
    groups: dict[str, list[str]] = {}
    for lane in runtime.lanes:
        groups[f"ready:{lane.name}"] = [lane.queue]
        groups[f"delayed:{lane.name}"] = [topology.delay_name(rung, lane.name) for rung in topology.rungs]

    def report(group: str, total: int) -> None:
        kind, account = group.split(":", 1)
        (metrics.upload_queue if kind == "ready" else metrics.retries_waiting).labels(account).set(total)

    return QueueWatcher(runtime.settings.broker_url, groups, report, ssl=runtime.settings.broker_ssl())
