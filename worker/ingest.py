"""The ingest pipeline: message -> events -> batches -> hand-off -> acknowledgement.

Runs in the worker's main process, on every message of the ``activities`` queue (plain
JSON) and of Celery's default queue (``activities.ingest`` task messages). It does the cheap
work only, because this one process is the throughput bottleneck: parse the body once
(orjson), dead-letter what cannot be read or routed, group the rest by ``asset_id``. An
event travels on as the text it arrived in; strict parsing, validation and the upload run
in the pool (:mod:`worker.delivery`).

A message is acknowledged once each of its events is handed on: published, broker-confirmed,
in an upload-task message or in the dead-letter queue (:class:`~worker.batching.Ticket`),
in order and many at a time (:class:`~worker.acks.Acker`). When the broker does not confirm
a hand-off, it is kept and tried again on the next tick; the messages behind it stay
unacknowledged meanwhile, so nothing is lost if the worker dies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import orjson

from config.settings import Settings
from worker import deadletter, jsonutil, metrics
from worker.acks import Acker
from worker.batching import Batch, Batcher, Ticket
from worker.clock import Clock
from worker.errors import PublishError
from worker.broker.messages import INGEST_TASK
from worker.parsing import ACCEPTED_ENCODINGS, JSON_CONTENT_TYPE, MAX_MESSAGE_BYTES, MalformedBody, parse_body
from worker.publisher import Outgoing, PublishFn
from worker.validation import routing_key_of, validate_event

logger = logging.getLogger(__name__)

#: The largest event forwarded, in bytes of JSON. The API documents no limit; an event this
#: big is a producer bug (a blob in activity_params), and a batch of them would be huge.
MAX_EVENT_BYTES = 512 * 1024

#: Header of an event replayed from the dead-letter queue (worker.dlq): how many times it was
#: replayed. Copied into the dead letters written here, so a loop shows; the upload task's
#: dead letters cannot see it (a batch carries events without their messages' headers).
REPLAYS_HEADER = "x-replays"


class Message(Protocol):
    """What the pipeline needs of a kombu message."""

    body: bytes | str
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    delivery_tag: int


#: batches released together -> the upload-task messages that carry them (bundled).
UploadMessagesFn = Callable[[list[Batch]], list[Outgoing]]

#: (asset_id or None when it cannot be routed, the event's JSON text, the event, its size in bytes).
Routed = tuple[str | None, str, Any, int]


class Ingest:
    """Turns source messages into upload-task messages and dead letters."""

    def __init__(
        self,
        *,
        settings: Settings,
        batcher: Batcher,
        acker: Acker,
        publish: PublishFn,
        upload_messages: UploadMessagesFn,
        clock: Clock,
        max_outstanding: int,
        release_slack: int = 0,
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.acker = acker
        self.publish = publish
        self.upload_messages = upload_messages
        self.clock = clock
        #: Unacknowledged messages past which the oldest batch is released (backpressure).
        self.max_outstanding = max_outstanding
        #: Events released beyond the excess when over the limit, so that the next messages do
        #: not each release one small batch (one confirm round trip per message).
        self.release_slack = release_slack
        #: Hand-offs the broker has not confirmed yet: messages, then what to do once it has.
        self._pending: list[tuple[list[Outgoing], list[Callable[[], None]]]] = []
        self.counts = {"messages": 0, "events": 0, "malformed": 0, "invalid": 0, "batches": 0}

    def on_message(self, message: Message) -> None:
        """Take one source message: dead-letter or batch each of its events."""
        self.counts["messages"] += 1
        self.acker.received(message.delivery_tag)
        ticket = Ticket(partial(self.acker.complete, message.delivery_tag))
        deliveries = (message.headers or {}).get("x-delivery-count")
        limit = self.settings.delivery_limit
        if limit and isinstance(deliveries, int) and deliveries >= limit:
            self._poison(message, ticket, deliveries)
            return
        try:
            events = self._events_of(message)
        except MalformedBody as exc:
            self._malformed(message, ticket, exc.error, exc.details)
            return
        except Exception as exc:  # a bug must not stop the consumer nor lose the message
            logger.exception("Unexpected %s reading a message; dead-lettering it whole", type(exc).__name__)
            self._malformed(message, ticket, f"The worker failed to read this message ({type(exc).__name__}).",
                            {"problem": "internal_error"})
            return
        self.counts["events"] += len(events)
        replays = _replays_of(message)
        outgoing: list[Outgoing] = []
        ready: list[Batch] = []
        for asset_id, text, event, size in events:
            if asset_id is None:
                outgoing.append(self._invalid(event, replays))
            elif size > MAX_EVENT_BYTES:
                outgoing.append(self._too_large(event, asset_id, size, replays))
            else:
                ready += self.batcher.add(asset_id, text, size, ticket, replays)
        metrics.events_read(received=len(events), batched=len(events) - len(outgoing))
        excess = self.acker.outstanding - self.max_outstanding
        if excess > 0:  # release the oldest batches: enough for the excess, and some slack
            released = 0
            while released < excess + self.release_slack and self.batcher.buffered:
                batch = self.batcher.release_oldest()
                assert batch is not None
                ready.append(batch)
                released += len(batch)
        outgoing += self._uploads(ready)
        self._hand_off(outgoing, [b.handed_on for b in ready] + [ticket.release])

    def tick(self) -> None:
        """Called often by a timer: retry unconfirmed hand-offs, release batches due."""
        self._retry_pending()
        self.acker.ack_stragglers()
        due = self.batcher.due()
        if due:
            self._hand_off(self._uploads(due), [b.handed_on for b in due])

    def flush_all(self) -> None:
        """Hand on every open batch (warm shutdown); raises PublishError if the broker won't."""
        batches = self.batcher.drain()
        self._hand_off(self._uploads(batches), [b.handed_on for b in batches])
        if self._pending:
            raise PublishError(f"{len(self._pending)} hand-offs were not confirmed by the broker")

    def discard(self) -> int:
        """Forget everything in memory (the channel is gone; the broker redelivers it all)."""
        self._pending.clear()
        self.acker.forget()
        return self.batcher.discard()

    def _events_of(self, message: Message) -> list[Routed]:
        body = message.body
        task = (message.headers or {}).get("task")
        if task is None and _plain_json(message) and len(body) <= MAX_MESSAGE_BYTES:
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                event = None  # the strict parser below says exactly what is wrong
            if isinstance(event, dict):  # the fast path: one event, forwarded as its text
                data = body.encode("utf-8") if isinstance(body, str) else body
                return [(routing_key_of(event), data.decode("utf-8"), event, len(data))]
        events = parse_body(body, content_type=message.content_type or None,
                            content_encoding=message.content_encoding or None)
        if task is not None:
            events = self._task_events(str(task), events)
        routed = []
        for event in events:
            data = jsonutil.dumps(event)
            routed.append((routing_key_of(event), data.decode("utf-8"), event, len(data)))
        return routed

    def _task_events(self, task: str, body: list[Any]) -> list[Any]:
        """The events of a Celery task message: body ``[args, kwargs, embed]``."""
        if task != INGEST_TASK:
            raise MalformedBody(
                f"This worker only runs {INGEST_TASK!r}; a task message for {task!r} reached its "
                "queue. Send other tasks to another queue.",
                {"problem": "unknown_task", "task": task},
            )
        args = body[0] if len(body) == 3 and isinstance(body[0], list) else None
        if not args or len(args) != 1 or not isinstance(args[0], (dict, list)) or args[0] == []:
            raise MalformedBody(
                f"{INGEST_TASK} takes one argument, an event or a non-empty list of events: "
                "send_task('activities.ingest', args=[event_or_list])",
                {"problem": "bad_task_arguments", "task": INGEST_TASK},
            )
        return args[0] if isinstance(args[0], list) else [args[0]]

    def _malformed(self, message: Message, ticket: Ticket, error: str, details: dict[str, Any]) -> None:
        self.counts["malformed"] += 1
        metrics.unreadable(deadletter.MALFORMED)
        logger.warning("Dead-lettering an unreadable message: %s", error)
        dead = deadletter.body_envelopes(
            reason=deadletter.MALFORMED, error=error, raw=message.body, details=details,
            failed_at=self.clock.now(), replays=_replays_of(message),
        )
        self._hand_off(deadletter.messages(self.settings.dead_letter_queue, dead), [ticket.release])

    def _poison(self, message: Message, ticket: Ticket, deliveries: int) -> None:
        """A message that was delivered ``deliveries`` times and never handled: each time the
        worker died with it in hand. Reading it again might kill the worker again: don't."""
        self.counts["malformed"] += 1
        metrics.unreadable(deadletter.POISON)
        error = (
            f"This message was delivered {deliveries} times and the worker died each time before "
            "handling it. It was set aside so that it cannot crash the worker again: look at the "
            "worker's logs around failed_at, then replay its raw body once the cause is fixed."
        )
        logger.error("Dead-lettering a message delivered %d times (poison)", deliveries)
        dead = deadletter.body_envelopes(
            reason=deadletter.POISON, error=error, raw=message.body,
            details={"deliveries": deliveries}, attempts=deliveries, failed_at=self.clock.now(),
            replays=_replays_of(message),
        )
        self._hand_off(deadletter.messages(self.settings.dead_letter_queue, dead), [ticket.release])

    def _invalid(self, event: Any, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        metrics.refused_in_ingest("unroutable")
        errors = validate_event(event) or {"asset_id": ["asset_id is missing or not a string."]}
        body = deadletter.envelope(
            reason=deadletter.INVALID,
            error=f"The event cannot be routed: {'; '.join(m for ms in errors.values() for m in ms)}",
            event=event,
            details=errors,
            failed_at=self.clock.now(),
            replays=replays,
        )
        return deadletter.message(self.settings.dead_letter_queue, body)

    def _too_large(self, event: Any, asset_id: str, size: int, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        metrics.refused_in_ingest("too_large")
        body = deadletter.envelope(
            reason=deadletter.INVALID,
            error=f"The event is {size} bytes of JSON, over the {MAX_EVENT_BYTES}-byte limit per event: "
            "send large data by reference, not inside activity_params.",
            event=event,
            details={"_schema": ["event too large"], "size": size, "max_bytes": MAX_EVENT_BYTES},
            asset_id=asset_id,
            failed_at=self.clock.now(),
            replays=replays,
        )
        return deadletter.message(self.settings.dead_letter_queue, body)

    def _uploads(self, batches: list[Batch]) -> list[Outgoing]:
        if not batches:
            return []
        self.counts["batches"] += len(batches)
        return self.upload_messages(batches)

    def _hand_off(self, messages: list[Outgoing], then: list[Callable[[], None]]) -> None:
        if not messages and not self._pending:  # the common case: nothing to publish yet
            for callback in then:
                callback()
            return
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


def _plain_json(message: Message) -> bool:
    """Does the message declare JSON in UTF-8 (or nothing)? Else the strict parser explains."""
    content_type = message.content_type
    encoding = message.content_encoding
    return (not content_type or content_type.split(";")[0].strip().lower() == JSON_CONTENT_TYPE) and (
        not encoding or encoding.lower() in ACCEPTED_ENCODINGS
    )


def _replays_of(message: Message) -> int:
    """The message's ``x-replays`` header: a count, or 0 when absent or not a count."""
    value = (message.headers or {}).get(REPLAYS_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
