"""The Celery tasks: ``activities.upload`` (one bundle of batches) and ``activities.ingest``.

``activities.upload`` runs on the worker's thread pool, for the account its bundle names (its
lane: :mod:`worker.upload.lanes`). It acknowledges its message (Celery does, ``acks_late``) only
once :meth:`~worker.upload.delivery.Delivery.deliver` returned, i.e. once every event of the
bundle is delivered, dead-lettered or waiting in a delay queue, each confirmed by the broker.
What it cannot handle it never acknowledges:

- the broker did not confirm the outcome (dead letters, retries): it is published again on this
  thread, with a backoff (:data:`OUTCOME_BACKOFF`); still refused, what was to be retried is
  written to the dead-letter queue as ``unhandled`` instead (only what was not delivered);
  still refused, the outcome is kept in memory by task id and the message requeued: its
  redelivery publishes that outcome instead of uploading the events again. After
  :data:`PUBLISH_ROUNDS` rounds the message is rejected to the upload queue's dead-letter
  route, where the salvage (:mod:`worker.deadletter.salvage`) writes the kept outcome's events
  when it runs in this process, or else every event of the bundle, saying so;
- an error outside delivery (a message that is not a bundle, arguments from another version, an
  account no longer configured): Celery rejects the message, and RabbitMQ dead-letters it the
  same way. Nothing is deleted.

``activities.ingest`` messages never reach this code in a running worker: the ingest step
consumes them from Celery's default queue. The task is registered so that the name is known
and a worker consuming that queue the usual way still feeds the same path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker.broker.messages import INGEST_TASK, UPLOAD_TASK, Bundle, read_bundle
from worker.broker.publisher import Outgoing
from worker.errors import PublishError

logger = logging.getLogger(__name__)

#: Redeliveries that try to publish a kept outcome before the message is set aside.
PUBLISH_ROUNDS = 3

#: Seconds between the tries to publish an outcome on the task's thread (its message is held
#: meanwhile: well within RabbitMQ's consumer_timeout).
OUTCOME_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)

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
        lane = rt.lane_of(bundle)  # an account no longer configured: raises, rejected the same way
        task_id = str(self.request.id)
        if not rt.seen.start(task_id, timeout=rt.attempt_bound(bundle)):
            logger.info("%s: redelivered after its upload was done here; not uploaded again", bundle.summary())
            return {"events": bundle.events, "redelivered": True}
        done = False
        try:
            kept = rt.unpublished.get(task_id)
            if kept is not None:  # a redelivery whose events were already handled here
                rounds, messages = kept
                _settle(rt, task_id, bundle, messages, rounds)
                done = True
                return {"events": bundle.events, "republished": len(messages)}
            try:
                report = lane.delivery.deliver(bundle)
            except PublishError as exc:
                logger.error("%s: the broker did not confirm the outcome (%s); publishing it again", bundle.summary(),
                             exc)
                _settle(rt, task_id, bundle, exc.messages, 0)
                done = True
                return {"events": bundle.events, "republished": len(exc.messages)}
            done = True
        finally:
            rt.seen.finish(task_id, done=done)
        return {
            "account": lane.name, "events": report.received, "batches": report.batches, "delivered": report.delivered,
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


def _settle(rt: Any, task_id: str, bundle: Bundle, messages: Sequence[Outgoing], rounds: int) -> None:
    """Publish an outcome the broker did not confirm (see the module docstring); return once it is
    confirmed somewhere, or raise Reject."""
    wait = threading.Event()  # never set: a wait with a deadline, not a sleep
    for delay in (0.0, *rt.outcome_backoff):
        wait.wait(delay)
        try:
            rt.publishers.publish(messages)
        except PublishError as exc:
            last = exc
            continue
        rt.unpublished.pop(task_id, None)
        return
    try:
        rt.publishers.publish(rt.outcome_as_dead_letters(messages, error=str(last)))
    except PublishError as exc:
        last = exc
    else:
        rt.unpublished.pop(task_id, None)
        logger.error("%s: the broker refused its outcome again and again (%s); what was to be retried is in the "
                     "dead-letter queue as 'unhandled'", bundle.summary(), last)
        return
    _keep(rt, task_id, rounds + 1, list(messages))  # the salvage reads it, if it runs here
    if rounds + 1 >= PUBLISH_ROUNDS:
        logger.error("Task %s: the broker refused its outcome %d times (%s); setting the message aside (the salvage "
                     "writes its events to the dead-letter queue as 'unhandled')", task_id, rounds + 1, last)
        raise Reject(str(last), requeue=False)
    raise Reject(str(last), requeue=True)


def _keep(rt: Any, task_id: str, rounds: int, messages: list[Any]) -> None:
    while len(rt.unpublished) >= KEPT_OUTCOMES:
        rt.unpublished.pop(next(iter(rt.unpublished)))
    rt.unpublished[task_id] = (rounds, messages)
