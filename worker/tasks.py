"""The Celery tasks: ``activities.upload`` (one batch) and ``activities.ingest``.

``activities.ingest`` messages never reach this code in a running worker: the ingest step
consumes them from Celery's default queue and batches them with the plain-JSON ones. The
task is registered so that the name is known (for ``celery inspect registered``) and so that
a worker consuming that queue the usual way still feeds the same path.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import Reject

from worker.app import app
from worker.errors import PublishError
from worker.messages import INGEST_TASK, UPLOAD_TASK
from worker.runtime import process_runtime

logger = logging.getLogger(__name__)


@app.task(
    name=UPLOAD_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def upload(self: Task, asset_id: str, events: list[Any], attempts: int = 0) -> dict[str, Any]:
    """Validate and upload one batch; dead-letter or schedule a retry for what fails."""
    runtime = process_runtime(app)
    try:
        report = runtime.delivery.deliver(asset_id, events, attempts)
    except PublishError as exc:
        # Nothing was acknowledged: the broker did not take the hand-off. Put the message
        # back; it is delivered again (perhaps twice), never lost.
        logger.error("asset_id=%s: could not hand on results (%s); requeueing the batch", asset_id, exc)
        raise Reject(str(exc), requeue=True) from None
    except Exception as exc:  # a bug: retried with backoff, then dead-lettered; never acked as is
        logger.exception("asset_id=%s: unexpected %s delivering %d events", asset_id, type(exc).__name__, len(events))
        try:
            runtime.delivery.reschedule(asset_id, events, attempts, exc)
        except PublishError as publish_error:
            raise Reject(str(publish_error), requeue=True) from None
        return {"asset_id": asset_id, "events": len(events), "error": type(exc).__name__}
    return {
        "asset_id": asset_id,
        "events": report.received,
        "delivered": report.delivered,
        "dead": report.dead,
        "retried": report.retried,
        "requests": report.requests,
    }


@app.task(name=INGEST_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def ingest(self: Task, event_or_list: Any) -> int:
    """Hand the events on to the ``activities`` queue, where the ingest step batches them."""
    runtime = process_runtime(app)
    try:
        return runtime.forward_to_ingest(event_or_list)
    except PublishError as exc:
        raise Reject(str(exc), requeue=True) from None
