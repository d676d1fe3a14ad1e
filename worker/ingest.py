"""The ingest pipeline: message -> events -> batches -> hand-off -> acknowledgement.

Runs in the worker's main process, on every message of the ``activities`` queue (plain
JSON) and of Celery's default queue (``activities.ingest`` task messages). It does the cheap
work only: parse the body once, dead-letter what cannot be read or routed, group the rest by
``asset_id``. Full validation and the upload run in the pool (:mod:`worker.delivery`).

A message is acknowledged once each of its events is handed on: published, broker-confirmed,
in an upload-task message or in the dead-letter queue (:class:`~worker.batching.Ticket`).
When the broker does not confirm a hand-off, it is kept and tried again on the next tick; the
messages behind it stay unacknowledged meanwhile, so nothing is lost if the worker dies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from config.settings import Settings
from worker import deadletter, jsonutil
from worker.batching import Batch, Batcher, Ticket
from worker.clock import Clock
from worker.errors import PublishError
from worker.messages import INGEST_TASK
from worker.parsing import MalformedBody, parse_body, raw_text
from worker.publisher import Outgoing, PublishFn
from worker.validation import routing_key_of, validate_event

logger = logging.getLogger(__name__)


class Message(Protocol):
    """What the pipeline needs of a kombu message."""

    body: bytes | str
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]

    def ack(self) -> None: ...


#: (queue, asset_id, events) -> the upload-task message for a batch.
UploadMessageFn = Callable[[Batch], Outgoing]


class Ingest:
    """Turns source messages into upload-task messages and dead letters."""

    def __init__(
        self,
        *,
        settings: Settings,
        batcher: Batcher,
        publish: PublishFn,
        upload_message: UploadMessageFn,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.publish = publish
        self.upload_message = upload_message
        self.clock = clock
        #: Hand-offs the broker has not confirmed yet: messages, then what to do once it has.
        self._pending: list[tuple[list[Outgoing], list[Callable[[], None]]]] = []
        self.counts = {"messages": 0, "events": 0, "malformed": 0, "invalid": 0, "batches": 0}

    def on_message(self, message: Message) -> None:
        """Take one source message: dead-letter or batch each of its events."""
        self.counts["messages"] += 1
        ticket = Ticket(message.ack)
        try:
            events = self._events_of(message)
        except MalformedBody as exc:
            self.counts["malformed"] += 1
            logger.warning("Dead-lettering an unreadable message: %s", exc.error)
            dead = deadletter.envelope(
                reason=deadletter.MALFORMED,
                error=exc.error,
                raw=raw_text(message.body),
                details=exc.details,
                failed_at=self.clock.now(),
            )
            self._hand_off([deadletter.message(self.settings.dead_letter_queue, dead)], [ticket.release])
            return
        self.counts["events"] += len(events)
        share = max(1, len(message.body) // len(events))
        outgoing: list[Outgoing] = []
        ready: list[Batch] = []
        for event in events:
            asset_id = routing_key_of(event)
            if asset_id is None:
                outgoing.append(self._invalid(event))
            else:
                ready += self.batcher.add(asset_id, event, share, ticket)
        self._hand_off(outgoing + [self._upload(batch) for batch in ready], [b.handed_on for b in ready] + [ticket.release])

    def tick(self) -> None:
        """Called often by a timer: retry unconfirmed hand-offs, release batches due."""
        self._retry_pending()
        due = self.batcher.due()
        if due:
            self._hand_off([self._upload(b) for b in due], [b.handed_on for b in due])

    def flush_all(self) -> None:
        """Hand on every open batch (warm shutdown); raises PublishError if the broker won't."""
        batches = self.batcher.drain()
        self._hand_off([self._upload(b) for b in batches], [b.handed_on for b in batches])
        if self._pending:
            raise PublishError(f"{len(self._pending)} hand-offs were not confirmed by the broker")

    def discard(self) -> int:
        """Forget everything in memory (the channel is gone; the broker redelivers it all)."""
        self._pending.clear()
        return self.batcher.discard()

    @property
    def backlog(self) -> int:
        """Hand-offs waiting for the broker."""
        return len(self._pending)

    def _events_of(self, message: Message) -> list[Any]:
        headers = message.headers or {}
        task = headers.get("task")
        if task is None:
            return parse_body(message.body, content_type=message.content_type or None,
                              content_encoding=message.content_encoding or None)
        if task != INGEST_TASK:
            raise MalformedBody(
                f"This worker only runs {INGEST_TASK!r}; a task message for {task!r} reached its "
                "queue. Send other tasks to another queue.",
                {"task": str(task)},
            )
        body = parse_body(message.body, content_type=message.content_type or None,
                          content_encoding=message.content_encoding or None)
        args = body[0] if len(body) == 3 and isinstance(body[0], list) else None
        if not args or len(args) != 1:
            raise MalformedBody(
                f"{INGEST_TASK} takes one argument, an event or a list of events: "
                "send_task('activities.ingest', args=[event_or_list])",
                {"task": INGEST_TASK},
            )
        return parse_body(jsonutil.dumps(args[0]), content_type="application/json")

    def _invalid(self, event: Any) -> Outgoing:
        self.counts["invalid"] += 1
        errors = validate_event(event) or {"asset_id": ["asset_id is missing or not a string."]}
        body = deadletter.envelope(
            reason=deadletter.INVALID,
            error=f"The event cannot be routed: {'; '.join(m for ms in errors.values() for m in ms)}",
            event=event,
            details=errors,
            failed_at=self.clock.now(),
        )
        return deadletter.message(self.settings.dead_letter_queue, body)

    def _upload(self, batch: Batch) -> Outgoing:
        self.counts["batches"] += 1
        return self.upload_message(batch)

    def _hand_off(self, messages: list[Outgoing], then: list[Callable[[], None]]) -> None:
        self._pending.append((messages, then))
        self._retry_pending()

    def _retry_pending(self) -> None:
        while self._pending:
            messages, then = self._pending[0]
            try:
                self.publish(messages)
            except PublishError as exc:
                logger.error("The broker did not confirm %d messages (%s); retrying", len(messages), exc)
                return
            self._pending.pop(0)
            for callback in then:
                callback()
