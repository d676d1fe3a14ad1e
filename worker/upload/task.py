"""The Celery tasks: ``activities.upload`` (one bundle of batches) and ``activities.ingest``.

``activities.upload`` runs on the worker's thread pool. It acknowledges its message (Celery
does, ``acks_late``) only once :meth:`~worker.upload.delivery.Delivery.deliver` returned, i.e.
once every event of the bundle is delivered, dead-lettered or waiting in a delay queue, each
confirmed by the broker. What it cannot handle it never acknowledges:

- the broker did not confirm the outcome: the outcome is kept in memory by task id and the
  message requeued; its redelivery publishes that outcome instead of uploading the events
  again (no loop of re-sent events), and after :data:`PUBLISH_ROUNDS` rounds the message is
  rejected to the upload queue's dead-letter route, where the salvage writes its events to
  the dead-letter queue;
- an error outside delivery (a message that is not a bundle, arguments from another version):
  Celery rejects the message, and RabbitMQ dead-letters it the same way. Nothing is deleted.

``activities.ingest`` messages never reach this code in a running worker: the ingest step
consumes them from Celery's default queue. The task is registered so that the name is known
and a worker consuming that queue the usual way still feeds the same path.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker.broker.messages import INGEST_TASK, UPLOAD_TASK, read_bundle
from worker.errors import PublishError

logger = logging.getLogger(__name__)

#: Redeliveries that try to publish a kept outcome before the message is set aside.
PUBLISH_ROUNDS = 3

#: Outcomes kept for redelivery, at most (the oldest are dropped: their message was
#: redelivered elsewhere, or will be uploaded again: duplicates, never losses).
KEPT_OUTCOMES = 1000


def register(app: Any) -> None:
    """Register both tasks on ``app`` (whose ``runtime()`` gives the process's runtime)."""

    @app.task(name=UPLOAD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def upload(self: Task, *args: Any) -> dict[str, Any]:
        """Upload one bundle; dead-letter or put back what fails."""
        rt = app.runtime()
        bundle = read_bundle(args)  # not a bundle: raises, and Celery rejects it (dead-lettered)
        task_id = str(self.request.id)
        if not rt.seen.start(task_id, timeout=rt.attempt_bound(bundle)):
            logger.info("%s: redelivered after its upload was done here; not uploaded again", bundle.summary())
            return {"events": bundle.events, "redelivered": True}
        done = False
        try:
            kept = rt.unpublished.pop(task_id, None)
            if kept is not None:  # a redelivery whose events were already handled here
                rounds, messages = kept
                _publish_kept(rt, task_id, rounds, messages)
                done = True
                return {"events": bundle.events, "republished": len(messages)}
            try:
                report = rt.delivery.deliver(bundle)
            except PublishError as exc:
                _keep(rt, task_id, 1, exc.messages)
                logger.error("%s: the broker did not confirm the outcome (%s); requeueing the message to publish "
                             "it again", bundle.summary(), exc)
                raise Reject(str(exc), requeue=True) from None
            done = True
        finally:
            rt.seen.finish(task_id, done=done)
        return {
            "events": report.received, "batches": report.batches, "delivered": report.delivered,
            "dead": dict(report.dead), "retried": report.retried, "held": report.held, "requests": report.requests,
        }

    @app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def ingest(self: Task, event_or_list: Any) -> int:
        """Hand the events on to the ``activities`` queue, where the ingest step batches them."""
        try:
            forwarded: int = app.runtime().forward_to_ingest(event_or_list)
            return forwarded
        except PublishError as exc:
            raise Reject(str(exc), requeue=True) from None


def _keep(rt: Any, task_id: str, rounds: int, messages: list[Any]) -> None:
    while len(rt.unpublished) >= KEPT_OUTCOMES:
        rt.unpublished.pop(next(iter(rt.unpublished)))
    rt.unpublished[task_id] = (rounds, messages)


def _publish_kept(rt: Any, task_id: str, rounds: int, messages: list[Any]) -> None:
    try:
        rt.publishers.publish(messages)
    except PublishError as exc:
        if rounds >= PUBLISH_ROUNDS:
            logger.error("Task %s: the broker refused its outcome %d times (%s); setting the message aside "
                         "(its events go to the dead-letter queue as 'unhandled')", task_id, rounds, exc)
            raise Reject(str(exc), requeue=False) from None
        _keep(rt, task_id, rounds + 1, messages)
        raise Reject(str(exc), requeue=True) from None
