"""The upload task's message, built by hand so one serialization serves the whole batch.

The consumer publishes one ``activities.upload`` message per batch (and the task one per
retry) through :class:`~worker.publisher.Publisher`, whose confirms are grouped; Celery's
own ``apply_async`` would wait for a confirm per message. Flower shows ``argsrepr``: a
summary, never the events.
"""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from kombu.serialization import register

from worker import jsonutil
from worker.publisher import Outgoing

#: The task that uploads one batch.
UPLOAD_TASK = "activities.upload"

#: The task Celery producers call; its messages are consumed by the ingest step.
INGEST_TASK = "activities.ingest"

#: The content type of upload-task bodies: JSON, read with orjson. Celery's main process
#: decodes every task body it receives (to tell protocol versions apart); a 600 KB batch
#: through the standard library's json cost it several milliseconds, orjson a fraction.
BATCH_CONTENT_TYPE = "application/x-netcore-batch+json"

register("netcore-batch", jsonutil.dumps, jsonutil.loads, content_type=BATCH_CONTENT_TYPE, content_encoding="binary")


def upload_message(
    app: Celery, queue: str, asset_id: str, events: list[Any], attempts: int = 0, countdown: float | None = None
) -> Outgoing:
    """An ``activities.upload`` task message for ``events`` of one ``asset_id``."""
    task_id = str(uuid.uuid4())
    summary = f"asset_id={asset_id!r}, {len(events)} events"
    if attempts:
        summary += f", attempt {attempts + 1}"
    task = app.amqp.as_task_v2(
        task_id,
        UPLOAD_TASK,
        args=[asset_id, events, attempts],
        kwargs={},
        countdown=countdown,
        retries=attempts,
        argsrepr=summary,
        kwargsrepr="{}",
    )
    headers = {key: value for key, value in task.headers.items() if value is not None}
    return Outgoing(
        queue, jsonutil.dumps(task.body), headers, BATCH_CONTENT_TYPE, dict(task.properties), content_encoding="binary"
    )
