"""Dead letters: one message per event that can never be delivered, with the reason why.

The dead-letter queue is data, to be replayed: each envelope keeps the original event whole
(``raw`` keeps the original body when it could not be parsed). Its shape is fixed by the
contract: ``reason``, ``error``, ``event``, ``raw``, ``details``, ``asset_id``, ``attempts``,
``failed_at``. Replaying is :mod:`worker.dlq`'s job.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from worker import jsonutil
from worker.publisher import Outgoing

#: The body could not be read: not JSON, not UTF-8, not an object or array of objects.
MALFORMED = "malformed"
#: The event breaks the API's documented rules (field errors in ``details``).
INVALID = "invalid"
#: The API answered 400 for this event alone (a rejected batch is split until isolated).
REJECTED = "rejected"
#: The API answered 401: the API key is wrong. Fix it, then replay these.
UNAUTHORIZED = "unauthorized"
#: The API answered another permanent status (403, 404, 405, 413, 422) or TLS failed.
REFUSED = "refused"
#: Transient failures went on past ``UPLOAD_MAX_RETRIES``. Replay once the API is back.
RETRIES_EXHAUSTED = "retries_exhausted"

#: A message (on a quorum queue) that the worker died holding, ``ACTIVITY_DELIVERY_LIMIT`` times.
POISON = "poison"
#: An upload task the worker could not handle (a bug, a message from another version): RabbitMQ
#: dead-lettered it and the salvage wrote its events here. Replay them once the cause is fixed.
UNHANDLED = "unhandled"

#: Every reason this worker writes.
REASONS = (MALFORMED, INVALID, REJECTED, UNAUTHORIZED, REFUSED, RETRIES_EXHAUSTED, POISON, UNHANDLED)

#: Header on each dead letter, so tools can filter without parsing bodies.
REASON_HEADER = "x-dead-letter-reason"


def envelope(
    *,
    reason: str,
    error: str,
    failed_at: datetime,
    event: Any = None,
    raw: str | None = None,
    details: dict[str, Any] | None = None,
    asset_id: str | None = None,
    attempts: int = 0,
    replays: int = 0,
) -> dict[str, Any]:
    """The dead-letter body for one event (or one unparseable body, with ``raw``)."""
    body: dict[str, Any] = {
        "reason": reason,
        "error": error,
        "event": event,
        "details": details or {},
        "asset_id": asset_id,
        "attempts": attempts,
        "failed_at": failed_at.isoformat().replace("+00:00", "Z"),
        "replays": replays,
    }
    if raw is not None:
        body["raw"] = raw
    return body


def message(queue: str, body: dict[str, Any]) -> Outgoing:
    """Wrap an envelope as a persistent message for the dead-letter queue."""
    return Outgoing(queue, jsonutil.dumps(body), {REASON_HEADER: body["reason"]})
