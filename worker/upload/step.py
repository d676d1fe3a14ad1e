"""The upload flow as a consumer bootstep: plugs :class:`~worker.upload.flow.UploadFlow` into the
worker's event loop, after Celery's own task consumer exists.

It also makes Celery's consumer reject (not acknowledge) a task message it cannot decode, so
that RabbitMQ dead-letters it to the salvage instead of deleting it.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from worker.clock import SystemClock
from worker.upload.flow import TICK, BrokerDepths, CeleryUploadConsumer, UploadFlow

logger = logging.getLogger(__name__)


class UploadFlowStep(bootsteps.StartStopStep):
    """See the module docstring."""

    name = "netcore.UploadFlow"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer: Any = None
        self._depths: BrokerDepths | None = None

    def start(self, c: Any) -> None:
        runtime = c.app.runtime()
        self._depths = BrokerDepths(runtime.settings.broker_url, runtime.topology)
        # Celery starts with a prefetch of UPLOAD_CONCURRENCY: take no more than the adaptive
        # limit from the first message on (the consumer has not started consuming yet)
        consumer = CeleryUploadConsumer(c, runtime.topology.upload, clock=SystemClock())
        consumer.set_prefetch(runtime.concurrency.limit)
        flow = UploadFlow(
            circuit=runtime.circuit, concurrency=runtime.concurrency, gate=runtime.gate,
            consumer=consumer, depths=self._depths, clock=SystemClock(),
            task_sizes=runtime.task_sizes, listener=runtime.listener,
        )
        c.on_decode_error = _reject_undecodable
        # the first tick comes from the timer, inside the event loop: only then has Celery given
        # its task consumer a callback and started it (consuming earlier would lose messages)
        self._timer = c.timer.call_repeatedly(TICK, flow.tick)

    def stop(self, c: Any) -> None:
        self._stop()

    def shutdown(self, c: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._depths is not None:
            self._depths.close()
            self._depths = None


def _reject_undecodable(message: Any, exc: Exception) -> None:
    """Celery acknowledges (deletes) a task message it cannot decode; reject it instead, so that
    the upload queue's dead-letter route keeps it."""
    logger.error("An upload task message could not be decoded (%s: %s); rejecting it to %s's dead-letter route",
                 type(exc).__name__, exc, message.delivery_info.get("routing_key"))
    message.reject()
