"""The ingest pipeline: message -> events -> batches -> hand-off -> acknowledgement.

Runs on the worker's event loop, on every message of the ``activities`` queue (plain JSON)
and of Celery's default queue (``activities.ingest`` task messages). It does the cheap work
only, because the event loop is the throughput bottleneck: decode the body once
(:mod:`worker.ingest.decoding`), dead-letter what cannot be read or routed, group the rest by
``asset_id`` (:mod:`worker.ingest.batching`). An event travels on as the text it arrived in; strict
parsing, validation and the upload run on the upload threads (:mod:`worker.upload.delivery`).

A message is acknowledged once each of its events is handed on: published, broker-confirmed,
in an upload-task message or in the dead-letter queue (:class:`~worker.ingest.batching.Ticket`,
:mod:`worker.ingest.handoff`), in order and many at a time (:class:`~worker.ingest.acks.Acker`).

What can go wrong costs one message at most, never the consumer:

- a body that cannot be read is dead-lettered whole (``malformed``);
- a bug anywhere in handling a message dead-letters that message whole (``unhandled``, its
  body kept and replayable) and the consumer goes on;
- a message a quorum queue delivered ``ACTIVITY_DELIVERY_LIMIT`` times is a *suspect*: the
  worker died holding it, or merely holding it among thousands of others. It is moved to the
  quarantine queue and handled there alone (:meth:`Ingest.handle_alone`); only if the worker
  dies again while it is the only message in hand is it set aside as ``poison``, body whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import amqp

from config.settings import Settings
from worker.broker.headers import SUSPECT_HEADER
from worker.broker.messages import MAX_BATCHES_PER_BUNDLE, Bundle, UploadBatch
from worker.broker.publisher import Outgoing, PublishFn
from worker.clock import Clock
from worker.deadletter import envelopes
from worker.errors import MalformedBody, PublishError
from worker.events.validation import validate_event
from worker.ingest.acks import Acker
from worker.ingest.batching import Batch, Batcher, Ticket
from worker.ingest.decoding import Message, Routed, delivery_count, events_of, replays_of
from worker.ingest.handoff import HandOff, Renderer

logger = logging.getLogger(__name__)

#: The largest event forwarded, in bytes of JSON. The API documents no limit; an event this
#: big is a producer bug (a blob in activity_params), and a batch of them would be huge.
MAX_EVENT_BYTES = 512 * 1024


#: Deliveries of a quarantined message (handled alone) that prove it kills the worker.
QUARANTINE_LIMIT = 2

#: Errors that mean the channel or the connection is gone: Celery reconnects, the broker
#: redelivers what was in hand. Everything else in handling a message is this module's bug.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (amqp.exceptions.ConnectionError,
                                                      amqp.exceptions.ChannelError, OSError)

#: bundle -> the upload-task message that carries it.
UploadMessageFn = Callable[[Bundle], Outgoing]


class IngestListener(Protocol):
    """What the consumer tells the outside (metrics): hooks, so that it imports none of them."""

    def events_read(self, *, received: int, batched: int) -> None:
        """A message held ``received`` events; ``batched`` of them went into batches."""

    def refused_in_ingest(self, invalid_reason: str) -> None:
        """One event dead-lettered ``invalid`` here (``unroutable``, ``too_large``)."""

    def unreadable(self, reason: str) -> None:
        """A whole message dead-lettered as ``reason`` (``malformed``, ``poison``, ``unhandled``)."""


class _Silent:
    """The listener when nobody listens."""

    def events_read(self, *, received: int, batched: int) -> None:
        pass

    def refused_in_ingest(self, invalid_reason: str) -> None:
        pass

    def unreadable(self, reason: str) -> None:
        pass


class Ingest:
    """Turns source messages into upload-task messages and dead letters."""

    def __init__(
        self,
        *,
        settings: Settings,
        batcher: Batcher,
        acker: Acker,
        publish: PublishFn,
        upload_message: UploadMessageFn,
        clock: Clock,
        max_outstanding: int,
        release_slack: int = 0,
        quarantine_queue: str | None = None,
        listener: IngestListener | None = None,
        bundle_batches: Callable[[], int] = lambda: MAX_BATCHES_PER_BUNDLE,
    ) -> None:
        self.settings = settings
        self.listener: IngestListener = listener or _Silent()
        self.batcher = batcher
        self.acker = acker
        self.clock = clock
        #: Unacknowledged messages past which the oldest batch is released (backpressure).
        self.max_outstanding = max_outstanding
        #: Events released beyond the excess when over the limit, so that the next messages do
        #: not each release one small batch (one confirm round trip per message).
        self.release_slack = release_slack
        #: Where suspects go to be handled alone (None: set aside at once, as ``poison``).
        self.quarantine_queue = quarantine_queue
        self.letters = envelopes.DeadLetters(queue=settings.dead_letter_queue, clock=clock)
        self.renderer = Renderer(make=upload_message, max_events=settings.batch_size,
                                 max_bytes=settings.batch_max_bytes, oversized=self._oversized,
                                 max_batches=bundle_batches)
        self.handoff = HandOff(publish=publish, render=self._render, clock=clock)
        self.counts = {"messages": 0, "events": 0, "malformed": 0, "invalid": 0, "batches": 0, "suspects": 0}

    @property
    def blocked(self) -> bool:
        """True while a hand-off waits for the broker: the consumer takes no new message."""
        return self.handoff.blocked

    # --- the steps ------------------------------------------------------------------------------

    def on_message(self, message: Message) -> None:
        """Take one source message: dead-letter or batch each of its events."""
        self.counts["messages"] += 1
        self.acker.received(message.delivery_tag)
        ticket = Ticket(partial(self.acker.complete, message.delivery_tag))
        hold = _Once(ticket.release)  # the message's own hold on its ticket, released once
        try:
            self._take(message, ticket, hold)
        except CONNECTION_ERRORS:
            raise  # the channel is gone: Celery reconnects and the broker redelivers
        except Exception as exc:  # a bug: this message is set aside whole, the consumer goes on
            logger.exception("Unexpected %s handling a message; dead-lettering it whole", type(exc).__name__)
            self._unhandled(message, exc, hold)

    def _take(self, message: Message, ticket: Ticket, hold: _Once) -> None:
        deliveries = delivery_count(message)
        limit = self.settings.delivery_limit
        if limit and deliveries is not None and deliveries >= limit:
            self._suspect(message, deliveries, hold)
            return
        try:
            events = events_of(message)
        except MalformedBody as exc:
            self._malformed(message, exc.error, exc.details, hold)
            return
        self.counts["events"] += len(events)
        replays = replays_of(message)
        dead, ready = self._route(events, replays,
                                  lambda asset_id, text, size: self.batcher.add(asset_id, text, size, ticket, replays))
        excess = self.acker.outstanding - self.max_outstanding
        if excess > 0:  # release the oldest batches: enough for the excess, and some slack
            released = 0
            while released < excess + self.release_slack and self.batcher.buffered:
                batch = self.batcher.release_oldest()
                assert batch is not None
                ready.append(batch)
                released += len(batch)
        self._send(dead, ready, [hold])

    def _route(self, events: list[Routed], replays: int,
               batch: Callable[[str, str, int], list[Batch]]) -> tuple[list[Outgoing], list[Batch]]:
        """Dead-letter what cannot be routed or is too big; ``batch(asset_id, text, size)`` the
        rest (it returns the batches that are ready)."""
        dead: list[Outgoing] = []
        ready: list[Batch] = []
        for asset_id, text, event, size in events:
            if asset_id is None:
                dead.append(self._invalid(event, replays))
            elif size > MAX_EVENT_BYTES:
                dead.append(self._too_large(event, asset_id, size, replays))
            else:
                ready += batch(asset_id, text, size)
        self.listener.events_read(received=len(events), batched=len(events) - len(dead))
        return dead, ready

    def tick(self) -> None:
        """Called often by a timer: retry unconfirmed hand-offs, acknowledge stragglers,
        release batches due."""
        self.handoff.tick()
        self.acker.ack_stragglers()
        due = self.batcher.due()
        if due:
            self._send([], due, [])

    def flush_all(self) -> None:
        """Hand on every open batch (warm shutdown); raises PublishError if the broker won't."""
        self.handoff.retry_now()
        self._send([], self.batcher.drain(), [])
        if self.handoff.blocked:
            raise PublishError(f"{self.handoff.waiting} hand-offs were not confirmed by the broker")

    def discard(self) -> int:
        """Forget everything in memory (the channel is gone; the broker redelivers it all)."""
        self.handoff.forget()
        self.acker.forget()
        return self.batcher.discard()

    def _send(self, dead: list[Outgoing], batches: list[Batch], then: list[Callable[[], None]]) -> None:
        self.counts["batches"] += len(batches)
        self.handoff.send(dead, batches, [b.handed_on for b in batches] + then)

    def _render(self, batches: list[Batch], limit: int | None) -> list[Outgoing]:
        return self.renderer(batches, limit) if batches else []

    # --- suspects: handled alone before being called poison ---------------------------------------

    def _suspect(self, message: Message, deliveries: int, hold: _Once) -> None:
        """Delivered ``deliveries`` times without being handled: the worker died holding it, or
        holding it among thousands of others. Prove which, alone, in the quarantine queue."""
        if self.quarantine_queue is None:
            self._poison(message, deliveries, hold)
            return
        self.counts["suspects"] += 1
        logger.warning("A message was delivered %d times without being handled: moving it to %s, where it is "
                       "handled alone", deliveries, self.quarantine_queue)
        headers = {**(message.headers or {}), SUSPECT_HEADER: deliveries}
        headers.pop("x-delivery-count", None)
        body = message.body.encode("utf-8", "surrogatepass") if isinstance(message.body, str) else bytes(message.body)
        moved = Outgoing(self.quarantine_queue, body, headers, message.content_type or "",
                         content_encoding=message.content_encoding or None)
        self._send([moved], [], [hold])

    def handle_alone(self, message: Message, ack: Callable[[], None]) -> None:
        """A quarantined message, the only one in hand: handled and handed on at once, so that
        a crash meanwhile implicates it alone. Delivered :data:`QUARANTINE_LIMIT` times here,
        it is what kills the worker: set aside as ``poison``, its body whole and replayable."""
        deliveries = delivery_count(message) or 0
        hold = _Once(ack)  # one acknowledgement, whichever path gets there
        if deliveries >= QUARANTINE_LIMIT:
            before = (message.headers or {}).get(SUSPECT_HEADER, 0)
            self._poison(message, (before if isinstance(before, int) else 0) + deliveries, hold)
            return
        try:
            try:
                events = events_of(message)
            except MalformedBody as exc:
                self._malformed(message, exc.error, exc.details, hold)
                return
            ticket = Ticket(hold)
            replays = replays_of(message)
            loads: dict[str, UploadBatch] = {}

            def gather(asset_id: str, text: str, size: int) -> list[Batch]:
                """One batch per asset_id, handed on at once (nothing waits in the batcher)."""
                load = loads.setdefault(asset_id, UploadBatch(asset_id, [], replays=[] if replays else None))
                load.events.append(text)
                if load.replays is not None:
                    load.replays.append(replays)
                return []

            dead, _ = self._route(events, replays, gather)
            batches = [_as_batch(load, ticket) for load in loads.values()]
            self._send(dead, batches, [ticket.release])
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:
            logger.exception("Unexpected %s handling a quarantined message; dead-lettering it whole",
                             type(exc).__name__)
            self._unhandled(message, exc, hold)

    # --- dead letters ---------------------------------------------------------------------------

    def _malformed(self, message: Message, error: str, details: dict[str, Any], hold: _Once) -> None:
        self.counts["malformed"] += 1
        self.listener.unreadable(envelopes.MALFORMED)
        logger.warning("Dead-lettering an unreadable message: %s", error)
        dead = self.letters.body(envelopes.MALFORMED, error, raw=message.body, details=details,
                                 replays=replays_of(message))
        self._send(dead, [], [hold])

    def _poison(self, message: Message, deliveries: int, hold: _Once) -> None:
        """Proven to kill the worker: never read again, set aside whole."""
        self.counts["malformed"] += 1
        self.listener.unreadable(envelopes.POISON)
        error = (
            f"This message was delivered {deliveries} times and the worker died each time before handling it, "
            "the last times while it was the only message in hand. It was set aside so that it cannot crash the "
            "worker again: look at the worker's logs around failed_at, then replay it once the cause is fixed."
        )
        logger.error("Dead-lettering a message delivered %d times (poison)", deliveries)
        dead = self.letters.body(envelopes.POISON, error, raw=message.body, details={"deliveries": deliveries},
                                 attempts=deliveries, replays=replays_of(message))
        self._send(dead, [], [hold])

    def _unhandled(self, message: Message, exc: Exception, hold: _Once) -> None:
        """A bug met this message: keep it whole (replayable when it is a producer's body)."""
        self.listener.unreadable(envelopes.UNHANDLED)
        error = (f"The worker failed on this message ({type(exc).__name__}) and set it aside whole so the rest "
                 "could go on; see its log at failed_at. Replay it once the cause is fixed.")
        details = {"problem": "internal_error", "exception": type(exc).__name__,
                   "replay_body": "task" not in (message.headers or {})}
        dead = self.letters.body(envelopes.UNHANDLED, error, raw=message.body, details=details,
                                 replays=replays_of(message))
        try:
            self.handoff.send(dead, [], [hold])
        except CONNECTION_ERRORS:
            raise
        except Exception:  # the hand-off itself is broken: leave the message unacknowledged
            logger.exception("Could not even set the message aside; it stays unacknowledged")

    def _invalid(self, event: Any, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        self.listener.refused_in_ingest("unroutable")
        errors = validate_event(event) or {"asset_id": ["asset_id is missing or not a string."]}
        error = f"The event cannot be routed: {'; '.join(m for ms in errors.values() for m in ms)}"
        return self.letters.event(envelopes.INVALID, error, event=event, details=errors, replays=replays)

    def _too_large(self, event: Any, asset_id: str, size: int, replays: int = 0) -> Outgoing:
        self.counts["invalid"] += 1
        self.listener.refused_in_ingest("too_large")
        error = (f"The event is {size} bytes of JSON, over the {MAX_EVENT_BYTES}-byte limit per event: send large "
                 "data by reference, not inside activity_params.")
        details = {"_schema": ["event too large"], "size": size, "max_bytes": MAX_EVENT_BYTES}
        return self.letters.event(envelopes.INVALID, error, event=event, details=details, asset_id=asset_id,
                                  replays=replays)

    def _oversized(self, batch: UploadBatch, limit: int) -> list[Outgoing]:
        """One event whose upload message is over the broker's ``max_message_size``: it cannot
        travel through this broker; kept whole in dead letters of parts under the limit."""
        self.listener.refused_in_ingest("too_large")
        error = (f"The event's upload message is over the broker's max_message_size ({limit} bytes): it cannot be "
                 "uploaded through this RabbitMQ. Send large data by reference, or raise max_message_size.")
        return self.letters.body(envelopes.INVALID, error, raw=batch.events[0],
                                 details={"_schema": ["event too large for the broker"], "max_bytes": limit},
                                 asset_id=batch.asset_id, replays=batch.replays_of(0), part_bytes=max(1024, limit // 4))


class _Once:
    """Calls ``callback`` the first time it is called, never again (a message's own hold)."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def _as_batch(load: UploadBatch, ticket: Ticket) -> Batch:
    """A batch of a quarantined message, holding its ticket once per event."""
    batch = Batch(load.asset_id, 0.0, load.events, [ticket] * len(load), 2 + sum(len(t) + 1 for t in load.events),
                  load.replays)
    for _ in load.events:
        ticket.hold()
    return batch
